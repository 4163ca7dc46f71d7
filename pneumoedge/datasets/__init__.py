"""Data sets: the Kaggle chest_xray folder layout and synthetic phantoms (tests and demos only)."""

from pneumoedge.datasets.kaggle import (
    BINARY_LABELS,
    MULTICLASS_LABELS,
    SPLITS,
    UNKNOWN,
    DatasetError,
    Sample,
    balanced_resample,
    class_weights,
    labels_for,
    patient_id,
    patient_split,
    scan,
    subtype_of,
    summary,
)
from pneumoedge.datasets.phantoms import (
    KINDS,
    generate_dataset,
    is_synthetic,
    render_phantom,
    write_examples,
)

__all__ = [
    "BINARY_LABELS",
    "MULTICLASS_LABELS",
    "SPLITS",
    "UNKNOWN",
    "DatasetError",
    "Sample",
    "balanced_resample",
    "class_weights",
    "labels_for",
    "patient_id",
    "patient_split",
    "scan",
    "subtype_of",
    "summary",
    "KINDS",
    "generate_dataset",
    "is_synthetic",
    "render_phantom",
    "write_examples",
]
