"""Training the founding architectures on a Kaggle-layout folder; a run folder records everything.

Every tensor fed to Keras comes from `pneumoedge.preprocessing.preprocess` with the run's
spec (decoded once into numpy arrays: the data sets are small), so the runtime, which calls
the same function with the spec saved in the run, sees exactly what training saw.
Augmentation (flip, small rotation, zoom, contrast) runs in the tf.data pipeline at training
time only; it is not part of the saved model, so export and the runtime never see it.

Run folder:
    model.keras      the best weights (EarlyStopping restores them; the checkpoint keeps them)
    spec.json        the PreprocessSpec
    run.json         architecture, task, labels, options, seed, provenance of the data
    split.json       the patient-level train/val split actually used (files and patients)
    history.json     per-epoch loss/accuracy/AUC (train and validation) and learning rate
    metrics.json     validation (and test, when the data has it) metrics and the threshold
    plots/           training curves, confusion matrices, ROC curves (PNG)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from pneumoedge import thresholds
from pneumoedge.atomic import write_json_atomic
from pneumoedge.export.architectures import get_architecture
from pneumoedge.export.errors import TrainingError
from pneumoedge.export.metric_plots import plot_history, plot_report
from pneumoedge.imageio import ImageError
from pneumoedge.preprocessing import PreprocessSpec, SpecError, preprocess
from pneumoedge.thresholds import DEFAULT_THRESHOLD_METHOD
from pneumoedge.validation.metrics import classification_metrics

log = logging.getLogger(__name__)

BALANCE = ("class_weight", "resample", "none")
LR_SCHEDULES = ("plateau", "cosine")
PROVENANCE_NAMES = ("PROVENANCE", "PROVENANCE.md", "PROVENANCE.txt", "PROVENANCE.json", "README", "README.md", "README.txt")


@dataclass
class RunResult:
    """What `train` produced."""

    run_dir: Path
    arch: str
    task: str
    labels: tuple[str, ...]
    spec: PreprocessSpec
    epochs_run: int
    best_epoch: int
    threshold: Optional[float]
    metrics: dict[str, Any]
    seconds: float
    files: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# data


def _datasets() -> Any:
    import pneumoedge.datasets.kaggle as kaggle

    return kaggle


def dataset_provenance(data_dir: Union[str, Path]) -> dict[str, Any]:
    """Where the data came from, and whether it is synthetic (a phantom generator's note)."""
    root = Path(data_dir).resolve()
    record: dict[str, Any] = {"data": str(root), "synthetic": False, "note": None}
    for folder in (root, root.parent):
        for name in PROVENANCE_NAMES:
            path = folder / name
            if path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace")
                lowered = text.lower()
                synthetic = "synthetic" in lowered or "phantom" in lowered
                if name.endswith(".json"):
                    try:
                        data = json.loads(text)
                        synthetic = bool(data.get("synthetic", synthetic))
                    except (json.JSONDecodeError, AttributeError):
                        pass
                record.update({"synthetic": synthetic, "note": str(path), "note_excerpt": text.strip()[:400]})
                return record
    return record


def load_arrays(
    samples: Sequence[Any], spec: PreprocessSpec, task: str, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The training data loader: `preprocess(sample.path, spec)` stacked, and class indices.

    Returns (x: (N, H, W, C) float32, y: (N,) int32 index into `labels`).
    """
    index = {name: i for i, name in enumerate(labels)}
    x = np.empty((len(samples), *spec.input_shape), dtype=np.float32)
    y = np.empty(len(samples), dtype=np.int32)
    for i, sample in enumerate(samples):
        try:
            x[i] = preprocess(sample.path, spec)
        except ImageError as exc:
            raise TrainingError(f"{sample.path}: {exc}") from None
        y[i] = index[sample.target(task)]
    return x, y


def _split_record(samples: Sequence[Any], task: str) -> list[dict[str, Any]]:
    return [{"path": str(s.path), "patient": s.patient, "target": s.target(task)} for s in samples]


def augmentation(spec: PreprocessSpec, seed: int) -> Any:
    """The training-time augmentation: horizontal flip, ±~10° rotation, ±10% zoom, ±20% contrast."""
    import keras
    from keras import layers

    low = 0.0 * spec.scale + spec.offset
    high = 255.0 * spec.scale + spec.offset
    if spec.mean is not None or spec.std is not None:
        mean = min(spec.mean or (0.0,))
        std = min(spec.std or (1.0,))
        low, high = (low - mean) / std, (high - mean) / std
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomRotation(0.03, fill_mode="constant", seed=seed + 1),
            layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
            layers.RandomContrast(0.2, value_range=(min(low, high), max(low, high)), seed=seed + 3),
        ],
        name="augmentation",
    )


# ---------------------------------------------------------------------------------------------
# training


def with_decode_reduction(spec: PreprocessSpec, reduction: int) -> PreprocessSpec:
    """`spec` with JPEG decode at 1/`reduction` (validated); a TrainingError for a bad value."""
    try:
        return replace(spec, decode_reduction=int(reduction))
    except (SpecError, TypeError, ValueError) as exc:
        raise TrainingError(str(exc)) from None


def _cosine(learning_rate: float, epochs: int) -> Callable[[int, float], float]:
    """Per-epoch rate: a short warm-up, then cosine decay to 1% (steadier than plateau halving
    when validation loss is noisy, as it is with small validation splits and BatchNorm)."""
    import math

    def rate(epoch: int, _: float) -> float:
        if epoch == 0 and epochs > 2:
            return learning_rate * 0.3
        progress = epoch / max(1, epochs - 1)
        return learning_rate * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))

    return rate


@dataclass(frozen=True)
class TrainingOptions:
    """How to train (`train`); the run records them in run.json's "options".

    Attributes:
        task: "binary" (NORMAL/PNEUMONIA, one sigmoid unit) or "multiclass" (NORMAL/BACTERIAL/VIRAL, softmax).
        val_fraction: share of train/ images, whole patients at a time, held out for validation.
        balance: "class_weight", "resample" (oversample minority classes) or "none".
        size: (height, width) override of the architecture's input size.
        patience: EarlyStopping patience in epochs (ReduceLROnPlateau uses half of it).
        threshold_method: how the binary threshold is chosen on validation data (`pneumoedge.thresholds`).
        decode_reduction: JPEG decode at 1/N scale (1, 2, 4, 8), written into the run's spec,
            so training tensors come from the same cheap reduced decode the runtime will do
            (PNG and 16-bit files are always fully decoded). Only for models trained here:
            it changes pixels, so a model trained at 1 must keep 1.
        lr_schedule: "plateau" (halve the rate when val_loss stalls) or "cosine" (decay to
            ~1% of `learning_rate` over `epochs`, after a one-epoch warm-up).
    """

    task: str = "binary"
    epochs: int = 20
    batch_size: int = 16
    seed: int = 0
    val_fraction: float = 0.2
    balance: str = "class_weight"
    size: Optional[tuple[int, int]] = None
    patience: int = 4
    learning_rate: float = 1e-3
    threshold_method: str = DEFAULT_THRESHOLD_METHOD
    augment: bool = True
    decode_reduction: int = 1
    lr_schedule: str = "plateau"

    def check(self) -> None:
        if self.balance not in BALANCE:
            raise TrainingError(f"balance must be one of {BALANCE}, got {self.balance!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingError("epochs and batch size must be at least 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainingError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        thresholds.parse(self.threshold_method)  # a typo fails before training, not after

    def record(self) -> dict[str, Any]:
        """The options as run.json records them."""
        return {
            "epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed, "val_fraction": self.val_fraction,
            "balance": self.balance, "patience": self.patience, "learning_rate": self.learning_rate, "augment": self.augment,
            "threshold_method": self.threshold_method, "decode_reduction": self.decode_reduction, "lr_schedule": self.lr_schedule,
        }


@dataclass
class Splits:
    """A data folder's samples for one training: train (and what is fitted on), validation, test."""

    labels: tuple[str, ...]
    train: list[Any]
    fit: list[Any]
    val: list[Any]
    test: list[Any]
    class_weights: Optional[dict[str, float]]


@dataclass
class Fitted:
    """A fitted model (the best epoch's weights) and its history."""

    model: Any
    history: dict[str, list[float]]
    best_epoch: int


def train(
    data_dir: Union[str, Path],
    arch: str,
    out_dir: Union[str, Path],
    options: TrainingOptions = TrainingOptions(),
    *,
    on_epoch: Optional[Callable[[int, int, dict[str, float]], None]] = None,
) -> RunResult:
    """Train architecture `arch` on the Kaggle-layout folder `data_dir`; write a run folder.

    Args:
        data_dir: root holding train/ (and optionally test/) with NORMAL/ and PNEUMONIA/.
        arch: a name from `architectures.ARCHITECTURES`.
        out_dir: the run folder (created; an existing model.keras there is refused).
        options: how to train.
        on_epoch: called as on_epoch(epoch, epochs, logs) after each epoch (progress bars).

    Returns:
        RunResult; the run folder's files are listed in `files`.
    """
    import keras

    started = time.perf_counter()
    options.check()
    architecture = get_architecture(arch)
    spec = with_decode_reduction(architecture.default_spec(options.size), options.decode_reduction)
    run_dir = Path(out_dir)
    if (run_dir / "model.keras").exists():
        raise TrainingError(f"{run_dir} already holds a trained model; choose another --out or remove it")
    splits = read_splits(data_dir, options)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plots").mkdir(exist_ok=True)
    keras.utils.set_random_seed(options.seed)

    log.info("preprocessing %d train + %d val images at %dx%d", len(splits.train), len(splits.val), spec.height, spec.width)
    x_train, y_train = load_arrays(splits.fit, spec, options.task, splits.labels)
    x_val, y_val = load_arrays(splits.val, spec, options.task, splits.labels)
    fitted = fit_model(architecture, (x_train, y_train), (x_val, y_val), spec, splits, options, run_dir, on_epoch)
    model = fitted.model
    model.save(run_dir / "model.keras")
    metrics, threshold, files = evaluate_fitted(model, (x_val, y_val), splits, spec, options, run_dir)
    files["training_curves"] = str(plot_history(fitted.history, run_dir / "plots" / "training_curves.png"))
    seconds = time.perf_counter() - started
    record = run_record(arch, architecture.description, spec, splits, fitted, options, dataset_provenance(data_dir), seconds)
    files.update(write_run(run_dir, spec, splits, fitted.history, metrics, record, options))
    return RunResult(run_dir, arch, options.task, splits.labels, spec, record["epochs_run"], fitted.best_epoch, threshold, metrics, seconds, files)


def read_splits(data_dir: Union[str, Path], options: TrainingOptions) -> Splits:
    """The patient-level train/validation split of train/, the fitting set after balancing, and test/."""
    kaggle = _datasets()
    task = options.task
    try:
        labels = kaggle.labels_for(task)
        samples = kaggle.scan(data_dir, split="train")
        train_samples, val_samples = kaggle.patient_split(samples, options.val_fraction, options.seed)
        if options.balance == "resample":
            fit_samples = kaggle.balanced_resample(train_samples, task, options.seed)
            weights = None
        else:
            fit_samples = train_samples
            weights = kaggle.class_weights(train_samples, task) if options.balance == "class_weight" else None
        for s in train_samples + val_samples:
            s.target(task)
    except kaggle.DatasetError as exc:
        raise TrainingError(str(exc)) from None
    if not val_samples:
        raise TrainingError(f"{data_dir}: too few patients to hold out a validation split (val_fraction {options.val_fraction})")
    test_samples: list[Any] = []
    if (Path(data_dir) / "test").is_dir():
        try:
            test_samples = kaggle.scan(data_dir, split="test")
            for s in test_samples:
                s.target(task)
        except kaggle.DatasetError as exc:
            log.warning("test split not used: %s", exc)
            test_samples = []
    return Splits(tuple(labels), train_samples, fit_samples, val_samples, test_samples, weights)


def fit_model(
    architecture: Any, train_xy: tuple[np.ndarray, np.ndarray], val_xy: tuple[np.ndarray, np.ndarray], spec: PreprocessSpec,
    splits: Splits, options: TrainingOptions, run_dir: Path, on_epoch: Optional[Callable[[int, int, dict[str, float]], None]],
) -> Fitted:
    """Build, compile and fit the model; return the best epoch's model (from the checkpoint) and the history."""
    import keras
    import tensorflow as tf

    (x_train, y_train), (x_val, y_val) = train_xy, val_xy
    labels, binary = list(splits.labels), options.task == "binary"
    model = architecture.build(options.task, num_classes=len(labels), size=options.size)
    model.compile(
        optimizer=keras.optimizers.Adam(options.learning_rate),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy"] + ([keras.metrics.AUC(name="auc")] if binary else []),
    )
    augmenter = augmentation(spec, options.seed) if options.augment else None
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train.astype(np.float32) if binary else y_train))
    train_ds = train_ds.shuffle(len(x_train), seed=options.seed, reshuffle_each_iteration=True).batch(options.batch_size)
    if augmenter is not None:
        train_ds = train_ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=1)
    train_ds = train_ds.prefetch(2)
    val_ds = tf.data.Dataset.from_tensor_slices((x_val, y_val.astype(np.float32) if binary else y_val)).batch(64)

    checkpoint = run_dir / "checkpoint.best.keras"
    callbacks: list[Any] = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, options.patience // 2), min_lr=1e-5)
        if options.lr_schedule == "plateau"
        else keras.callbacks.LearningRateScheduler(_cosine(options.learning_rate, options.epochs)),
        keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss", save_best_only=True),
    ]
    if on_epoch is not None:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: on_epoch(epoch + 1, options.epochs, dict(logs or {}))))
    weights = splits.class_weights
    class_weight = {labels.index(name): float(w) for name, w in weights.items()} if weights else None
    fit = model.fit(train_ds, validation_data=val_ds, epochs=options.epochs, class_weight=class_weight, callbacks=callbacks, verbose=0)
    history = {k: [float(v) for v in values] for k, values in fit.history.items()}
    val_losses = history.get("val_loss", [])
    best_epoch = int(np.argmin(val_losses)) + 1 if val_losses else len(history.get("loss", []))
    # EarlyStopping restores the best weights only when it stops early; load the best checkpoint
    # so the saved model is the best one in every case.
    if checkpoint.exists():
        model = keras.saving.load_model(checkpoint, compile=False)
        checkpoint.unlink()
    return Fitted(model, history, best_epoch)


def evaluate_fitted(
    model: Any, val_xy: tuple[np.ndarray, np.ndarray], splits: Splits, spec: PreprocessSpec, options: TrainingOptions, run_dir: Path
) -> tuple[dict[str, Any], Optional[float], dict[str, str]]:
    """Validation chooses the threshold; test (if any) is reported at it. Returns (metrics, threshold, plot files)."""
    x_val, y_val = val_xy
    labels = splits.labels
    p_val = model.predict(x_val, batch_size=64, verbose=0)
    metrics: dict[str, Any] = {"task": options.task, "labels": list(labels)}
    threshold = None
    if options.task == "binary":
        choice = thresholds.choose(options.threshold_method, y_val, p_val[:, 0]).as_dict()
        threshold = choice["threshold"]
        metrics["threshold"] = choice
    metrics["validation"] = classification_metrics(y_val, p_val, labels, threshold)
    files = {"model": str(run_dir / "model.keras")}
    files.update({f"validation_{k}": v for k, v in plot_report(run_dir / "plots", "validation", y_val, p_val, labels, metrics["validation"]).items()})
    if splits.test:
        x_test, y_test = load_arrays(splits.test, spec, options.task, labels)
        p_test = model.predict(x_test, batch_size=64, verbose=0)
        metrics["test"] = classification_metrics(y_test, p_test, labels, threshold)
        files.update({f"test_{k}": v for k, v in plot_report(run_dir / "plots", "test", y_test, p_test, labels, metrics["test"]).items()})
    return metrics, threshold, files


def run_record(
    arch: str, description: str, spec: PreprocessSpec, splits: Splits, fitted: Fitted, options: TrainingOptions,
    provenance: dict[str, Any], seconds: float,
) -> dict[str, Any]:
    """run.json: what was trained, how, on what, and with which versions."""
    import keras
    import tensorflow as tf

    return {
        "arch": arch,
        "description": description,
        "task": options.task,
        "labels": list(splits.labels),
        "head": "sigmoid" if options.task == "binary" else "softmax",
        "parameters": int(fitted.model.count_params()),
        "options": {**options.record(), "decode_reduction": spec.decode_reduction},
        "counts": {"train": len(splits.train), "fit": len(splits.fit), "val": len(splits.val), "test": len(splits.test)},
        "epochs_run": len(fitted.history.get("loss", [])),
        "best_epoch": fitted.best_epoch,
        "seconds": round(seconds, 1),
        "provenance": provenance,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }


def write_run(
    run_dir: Path, spec: PreprocessSpec, splits: Splits, history: dict[str, list[float]], metrics: dict[str, Any],
    record: dict[str, Any], options: TrainingOptions,
) -> dict[str, str]:
    """The run folder's JSON files (spec, labels, history, metrics, split, run); returns their paths."""
    split = {"seed": options.seed, "val_fraction": options.val_fraction,
             "train": _split_record(splits.train, options.task), "val": _split_record(splits.val, options.task)}
    contents = {"spec": spec.to_dict(), "labels": list(splits.labels), "history": history, "metrics": metrics, "split": split, "run": record}
    for name, data in contents.items():
        write_json_atomic(run_dir / f"{name}.json", data)
    return {name: str(run_dir / f"{name}.json") for name in contents}


@dataclass
class Run:
    """A run folder read back: what export and evaluation need."""

    run_dir: Path
    record: dict[str, Any]
    spec: PreprocessSpec
    labels: tuple[str, ...]
    metrics: dict[str, Any]

    @property
    def task(self) -> str:
        return self.record["task"]

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name

    @property
    def threshold(self) -> Optional[float]:
        choice = self.metrics.get("threshold")
        return None if choice is None else float(choice["threshold"])

    def split(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "split.json").read_text(encoding="utf-8"))


def is_run_dir(path: Union[str, Path]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "model.keras").is_file() and (p / "run.json").is_file()


def read_run(run_dir: Union[str, Path]) -> Run:
    """Read a run folder written by `train`; a clear error when it is not one."""
    root = Path(run_dir)
    if not is_run_dir(root):
        raise TrainingError(f"{root}: not a pneumoedge run folder (needs model.keras and run.json from `pneumoedge train`)")
    try:
        record = json.loads((root / "run.json").read_text(encoding="utf-8"))
        spec = PreprocessSpec.from_dict(json.loads((root / "spec.json").read_text(encoding="utf-8")))
        metrics = json.loads((root / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise TrainingError(f"{root}: unreadable run folder: {exc}") from None
    return Run(root, record, spec, tuple(record["labels"]), metrics)
