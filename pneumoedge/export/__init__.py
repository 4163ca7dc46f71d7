"""The TensorFlow side of pneumoedge: architectures, training, evaluation, ONNX export, int8.

Needs the `[export]` extra (TensorFlow, tf2onnx, onnx, matplotlib). Importing this package
imports nothing heavy; each module imports TensorFlow only inside the functions that need it,
so `pneumoedge --help` and the runtime never pay for it.

The API at a glance (import from the submodules):

    architectures.ARCHITECTURES, architectures.get_architecture
    training.train                        -> training.RunResult
    evaluation.evaluate_run / evaluate_model / classification_metrics / choose_threshold
    onnx_export.export_keras / export_runs / check_parity
    quantization.quantize_int8            -> quantization.QuantizationResult
    pipeline.run_demo, pipeline.build_bundle
"""

from pneumoedge.export.errors import ExportError, ParityError, QuantizationError, TrainingError

__all__ = ["ExportError", "ParityError", "QuantizationError", "TrainingError"]
