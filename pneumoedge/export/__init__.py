"""The TensorFlow side of pneumoedge: architectures, training, evaluation, ONNX export, int8.

Needs the `[export]` extra (TensorFlow, tf2onnx, onnx, matplotlib). Importing this package
imports nothing heavy; each module imports TensorFlow only inside the functions that need it,
so `pneumoedge --help` and the runtime never pay for it.

The API at a glance (import from the submodules):

    front_doors.export_models             -> which door a user's models go through (the CLI's one call)
    pipeline.export_runs                  training runs         -+
    foreign.export_foreign                a foreign Keras file   +-> bundle_builder.build_bundle
    onnx_wrap.export_onnx / wrap_onnx     a foreign ONNX         |   (members + one BundleOptions)
    pneumoedge.composition.compose_bundle `bundle create`       -+
    bundle_builder.BundleOptions, Int8Options, BundleResult
    training.train(data, arch, out, TrainingOptions) -> training.RunResult
    evaluation.evaluate_run / evaluate_model
    onnx_export.export_keras / check_parity
    int8_search.quantize_int8             -> quantization.QuantizationResult
    demo.run_demo
"""

from pneumoedge.export.errors import ExportError, ParityError, QuantizationError, TrainingError

__all__ = ["ExportError", "ParityError", "QuantizationError", "TrainingError"]
