"""Build the zoo: real keras.applications architectures, phantom-trained, exported as fp32 bundles.

    python benchmarks/zoo_build.py [--zoo /work/zoo] [--only xception,resnet50] [--epochs 2] [--force]

Each model is a `keras.applications` backbone (weights=None: nothing is downloaded) at the
input size such models are used with, under a GAP -> Dense head like chest X-ray transfer
models, trained briefly on synthetic phantoms (Kaggle layout, `pneumoedge.datasets.phantoms`)
so that its weights and batch-norm statistics have real structure, saved as `.keras`, and
exported through pneumoedge's own front door for a foreign model (`pneumoedge export MODEL.keras
--size ... --color ... --scale ...`) into ZOO/<name>/bundle (fp32). One model at a time (the
machine is small and shared); ZOO/READY lists each bundle as soon as it is written.

These are DEMONSTRATION models trained on phantoms: test objects for speed and quantization,
not classifiers of patients. Their provenance (ZOO/<name>/ZOO.json and the bundle's own
provenance, which records synthetic training data) says so. The zoo lives outside the
repository; this script rebuilds it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTICE = ("DEMONSTRATION MODEL trained on synthetic phantoms (pneumoedge.datasets.phantoms) for a few minutes: "
          "a test object for speed and int8 measurements, not a classifier of patients; not for clinical use.")
#: Phantoms for every model: a few hundred training images, a small test split for parity and int8 checks.
COUNTS = {"train": {"normal": 160, "bacteria": 80, "virus": 80}, "test": {"normal": 32, "bacteria": 16, "virus": 16}}


@dataclass(frozen=True)
class ZooModel:
    """One zoo member: the keras.applications constructor, its input size, its preprocessing and head."""

    name: str
    application: str
    size: int
    #: The CLI's spec options for this model's preprocessing (as its keras.applications family expects).
    spec_args: tuple[str, ...]
    #: "sigmoid" (Dense(1)) or "softmax" (Dense(2)), and an optional hidden Dense width.
    head: str = "sigmoid"
    hidden: int = 0
    kwargs: tuple[tuple[str, object], ...] = ()


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        # Like the real third-party Xception of issue 18: 150 px, GAP -> Dense(128, relu) -> Dense(2, softmax).
        ZooModel("xception", "Xception", 150, ("--scale", "1/127.5", "--offset", "-1"), head="softmax", hidden=128),
        ZooModel("densenet121", "DenseNet121", 224, ("--scale", "1/255", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")),
        ZooModel("resnet50", "ResNet50", 224, ("--scale", "1/255", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")),
        # EfficientNet carries its own Rescaling/Normalization layers: it takes 0..255 pixels.
        ZooModel("efficientnetb0", "EfficientNetB0", 224, ("--scale", "1"), hidden=128),
        ZooModel("mobilenetv2", "MobileNetV2", 224, ("--scale", "1/127.5", "--offset", "-1")),
    )
}


def spec_for(model: ZooModel):
    """The PreprocessSpec the CLI options of `model` declare (for training tensors identical to the runtime's)."""
    from pneumoedge.preprocessing import PreprocessSpec

    args = dict(zip(model.spec_args[::2], model.spec_args[1::2]))
    scale = args.get("--scale", "1")
    num, _, den = scale.partition("/")
    fields = {"height": model.size, "width": model.size, "color": "rgb", "resize": "bilinear",
              "scale": float(num) / float(den or 1), "offset": float(args.get("--offset", 0.0))}
    if "--mean" in args:
        fields["mean"] = tuple(float(v) for v in args["--mean"].split(","))
        fields["std"] = tuple(float(v) for v in args["--std"].split(","))
    return PreprocessSpec(**fields)


def ensure_data(zoo: Path) -> Path:
    """The shared phantom data set (320 px, Kaggle layout), generated once."""
    from pneumoedge.datasets import phantoms

    data = zoo / "data"
    if not phantoms.is_synthetic(data):
        if data.exists():
            shutil.rmtree(data)
        phantoms.generate_dataset(data, counts=COUNTS, size=(320, 320), seed=18, workers=1)
    return data


def phantom_files(folder: Path) -> list[Path]:
    """The phantoms' image files under `folder` (Kaggle layout: LABEL/*.jpeg), in a fixed order."""
    return sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


def tensors(files: list[Path], spec):
    """Files through pneumoedge's own preprocessing (the runtime's tensors, bit for bit)."""
    import numpy as np

    from pneumoedge.preprocessing import preprocess

    return np.stack([preprocess(f, spec) for f in files]).astype("float32")


def build_keras(model: ZooModel, data: Path, epochs: int, out: Path) -> dict:
    """Train `model` briefly on the phantoms and save it to `out` (.keras); returns the training figures."""
    import keras
    import numpy as np

    spec = spec_for(model)
    files = phantom_files(data / "train")
    x = tensors(files, spec)
    y = np.array([0 if f.parent.name == "NORMAL" else 1 for f in files])
    order = np.random.default_rng(0).permutation(len(y))  # the validation split takes the last rows
    x, y = x[order], y[order]
    keras.utils.set_random_seed(1)
    backbone = getattr(keras.applications, model.application)(
        input_shape=(model.size, model.size, 3), include_top=False, weights=None, **dict(model.kwargs))
    for layer in backbone.layers:  # batch norms average over ~1000 steps by default; a short run has ~40
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.8
    layers = [keras.Input((model.size, model.size, 3)), backbone, keras.layers.GlobalAveragePooling2D()]
    if model.hidden:
        layers.append(keras.layers.Dense(model.hidden, activation="relu"))
    if model.head == "softmax":
        layers.append(keras.layers.Dense(2, activation="softmax"))
        loss, target = "sparse_categorical_crossentropy", y
    else:
        layers.append(keras.layers.Dense(1, activation="sigmoid"))
        loss, target = "binary_crossentropy", y.astype("float32")
    net = keras.Sequential(layers, name=model.name)
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    started = time.perf_counter()
    history = net.fit(x, target, epochs=epochs, batch_size=16, validation_split=0.15, verbose=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    net.save(out)
    return {"train_images": len(files), "epochs": epochs, "train_seconds": round(time.perf_counter() - started, 1),
            "parameters": int(net.count_params()),
            "val_accuracy": float(history.history.get("val_accuracy", [float("nan")])[-1])}


def drop_identity_normalization(path: Path) -> bool:
    """Replace keras.applications' built-in Normalization layer by Identity when it is one (mean 0, variance 1,
    as with weights=None), saving the model in place; returns whether it changed anything.

    Why: Keras 3 keeps a Normalization layer's mean/variance as eager tensors, which tf.function captures as extra
    graph inputs, and `pneumoedge export` then fails (EfficientNet: "Required inputs ([... normalization_1/Sub/y:0
    ...]) are missing"). That is a bug of the export path for real EfficientNets (reported); the zoo takes the
    numerically identical model so that its other figures can be measured.
    """
    import keras
    import numpy as np

    net = keras.saving.load_model(path)
    backbone = net.layers[0]
    norms = [l for l in backbone.layers if isinstance(l, keras.layers.Normalization)]
    if not norms or not all(np.allclose(np.asarray(n.mean), 0) and np.allclose(np.asarray(n.variance), 1) for n in norms):
        return False

    def clone(layer):
        if isinstance(layer, keras.layers.Normalization):
            return keras.layers.Identity(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    plain = keras.models.clone_model(backbone, clone_function=clone)
    for old, new in zip(backbone.layers, plain.layers):
        if not isinstance(old, keras.layers.Normalization):
            new.set_weights(old.get_weights())
    rebuilt = keras.Sequential([keras.Input(backbone.input_shape[1:]), plain, *net.layers[1:]], name=net.name)
    x = np.random.default_rng(0).uniform(0, 255, (2, *backbone.input_shape[1:])).astype("float32")
    drift = float(np.abs(np.asarray(rebuilt(x, training=False)) - np.asarray(net(x, training=False))).max())
    if drift > 1e-5:
        raise RuntimeError(f"replacing the identity Normalization changed the outputs by {drift}")
    rebuilt.save(path)
    return True


def export_bundle(model: ZooModel, keras_path: Path, data: Path, out: Path) -> float:
    """`pneumoedge export` of the foreign Keras model (fp32), as a user would run it; returns its seconds."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "pneumoedge", "export", str(keras_path), "--out", str(out),
               "--size", str(model.size), str(model.size), "--color", "rgb", "--resize", "bilinear", *model.spec_args,
               "--labels", "NORMAL,PNEUMONIA", "--head", model.head,
               "--images", str(data / "test"), "--reference", str(data / "train"), "--name", f"zoo-{model.name}"]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    # This checkout's package (the script may run from a snapshot of the repository), not whatever is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    return round(time.perf_counter() - started, 1)


def mark_demonstration(bundle: Path, record: dict) -> None:
    """Say in the bundle's own provenance that it is a phantom-trained demonstration (export cannot know
    how a foreign model was trained); idempotent, member files and checksums untouched."""
    from pneumoedge.atomic import write_json_atomic

    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    provenance = manifest.setdefault("provenance", {})
    provenance.update(synthetic=True, demonstration=NOTICE, training={
        "data": "synthetic phantoms (pneumoedge.datasets.phantoms), Kaggle layout", "images": record.get("train_images"),
        "epochs": record.get("epochs"), "built_by": "benchmarks/zoo_build.py"})
    write_json_atomic(path, manifest)


def mark_ready(zoo: Path, name: str) -> None:
    """Add `name` to ZOO/READY (one bundle folder per line), keeping the others."""
    ready = zoo / "READY"
    lines = [l for l in (ready.read_text().splitlines() if ready.exists() else []) if l and not l.startswith(f"{name} ")]
    lines.append(f"{name} {zoo / name / 'bundle'} fp32")
    ready.write_text("\n".join(sorted(lines)) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("/work/zoo"))
    parser.add_argument("--only", default="", help="comma-separated names (default: all): " + ", ".join(ZOO))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rebuild models whose bundle exists")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"unknown zoo model(s) {unknown}; choose from {list(ZOO)}")
    sys.path.insert(0, str(ROOT))
    args.zoo.mkdir(parents=True, exist_ok=True)
    data = ensure_data(args.zoo)
    for name in names:
        model = ZOO[name]
        folder = args.zoo / name
        if (folder / "bundle" / "manifest.json").exists() and not args.force:
            print(f"{name}: bundle exists (use --force to rebuild)", flush=True)
            if (folder / "ZOO.json").exists():
                mark_demonstration(folder / "bundle", json.loads((folder / "ZOO.json").read_text()))
            mark_ready(args.zoo, name)
            continue
        print(f"== {name}: keras.applications.{model.application} {model.size}x{model.size}, training on phantoms", flush=True)
        keras_path, trained = folder / f"{name}.keras", folder / "train.json"
        if keras_path.exists() and trained.exists() and not args.force:  # trained before, its export failed: export again
            figures = json.loads(trained.read_text())
        else:
            figures = build_keras(model, data, args.epochs, keras_path)
            trained.write_text(json.dumps(figures) + "\n")
        if model.application.startswith("EfficientNet") and drop_identity_normalization(keras_path):
            figures["note"] = "identity Normalization layer replaced by Identity before export (Keras 3 eager-tensor capture bug)"
        figures["export_seconds"] = export_bundle(model, keras_path, data, folder / "bundle")
        record = {"notice": NOTICE, "model": asdict(model), "data": str(data), **figures}
        (folder / "ZOO.json").write_text(json.dumps(record, indent=1) + "\n")
        mark_demonstration(folder / "bundle", record)
        mark_ready(args.zoo, name)
        print(f"{name}: ready {json.dumps(figures)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
