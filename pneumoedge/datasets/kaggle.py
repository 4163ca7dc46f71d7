"""The Kaggle "Chest X-Ray Images (Pneumonia)" folder layout: scanning, patient ids, splits, weights."""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from pneumoedge.imageio import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BINARY_LABELS = ("NORMAL", "PNEUMONIA")
MULTICLASS_LABELS = ("NORMAL", "BACTERIAL", "VIRAL")
TASKS = ("binary", "multiclass")
#: Subtype of a PNEUMONIA file whose name says neither "bacteria" nor "virus". Usable for the
#: binary task; asking for its multiclass target raises `DatasetError`.
UNKNOWN = "UNKNOWN"
#: Suffixes (lower-cased) that `scan` takes as images: everything the shared decoder reads
#: (DICOM included), so a model can be trained on the files the clinic will run it on.
SUFFIXES = IMAGE_SUFFIXES

LAYOUT_HELP = (
    "expected the Kaggle chest_xray layout ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg "
    "(.jpeg, .jpg, .png, .bmp, .tif(f) or .dcm)"
)

# person1_bacteria_1, person1000_virus_1681 -> person1, person1000
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
# IM-0115-0001, NORMAL2-IM-0588-0001 -> IM-0115, NORMAL2-IM-0588 (the last number is the image)
_IM = re.compile(r"^(.*IM-\d+)-\d+$", re.IGNORECASE)


class DatasetError(ValueError):
    """A data set folder or sample list that cannot be used; the message says what was expected."""


def labels_for(task: str) -> tuple[str, ...]:
    """Class names of a task, in model output order ("binary" or "multiclass")."""
    if task == "binary":
        return BINARY_LABELS
    if task == "multiclass":
        return MULTICLASS_LABELS
    raise DatasetError(f"task must be one of {TASKS}, got {task!r}")


def patient_id(filename: str) -> str:
    """Patient id from a Kaggle file name (path or bare name; suffix ignored).

    Names that follow neither Kaggle pattern are their own patient (the whole stem), so
    unknown files never merge with other patients.
    """
    stem = Path(filename).stem
    match = _PERSON.match(stem) or _IM.match(stem)
    return match.group(1) if match else stem


def subtype_of(filename: str, folder_label: str) -> str:
    """NORMAL, BACTERIAL or VIRAL from a file name and its label folder.

    A PNEUMONIA file naming neither (or both) "bacteria" and "virus" gets `UNKNOWN`; it is
    fine for the binary task, and `Sample.target("multiclass")` refuses it.
    """
    label = folder_label.upper()
    if label == "NORMAL":
        return "NORMAL"
    if label != "PNEUMONIA":
        raise DatasetError(f"label folder must be one of {BINARY_LABELS}, got {folder_label!r}")
    name = Path(filename).name.lower()
    bacterial, viral = "bacteria" in name, "virus" in name
    if bacterial and not viral:
        return "BACTERIAL"
    if viral and not bacterial:
        return "VIRAL"
    return UNKNOWN


@dataclass(frozen=True)
class Sample:
    """One image of the data set."""

    path: Path
    label: str  # NORMAL | PNEUMONIA (the folder)
    subtype: str  # NORMAL | BACTERIAL | VIRAL | UNKNOWN (from the file name)
    patient: str
    split: str

    def target(self, task: str) -> str:
        """The class name this sample trains towards: label (binary) or subtype (multiclass)."""
        labels_for(task)
        if task == "binary":
            return self.label
        if self.subtype == UNKNOWN:
            raise DatasetError(
                f"{self.path}: PNEUMONIA file name says neither 'bacteria' nor 'virus', so it has "
                "no multiclass label; rename it, remove it, or use the binary task"
            )
        return self.subtype


def label_dirs(split_dir: Path) -> dict[str, Path]:
    """Label folders of one split, matched case-insensitively (NORMAL, normal)."""
    found: dict[str, Path] = {}
    for child in sorted(split_dir.iterdir()):
        if child.is_dir() and child.name.upper() in BINARY_LABELS:
            found[child.name.upper()] = child
    missing = [label for label in BINARY_LABELS if label not in found]
    if missing:
        raise DatasetError(f"{split_dir}: missing label folder(s) {missing}; {LAYOUT_HELP}")
    return found


def _split_dirs(root: Path, split: Optional[str]) -> list[tuple[str, Path]]:
    if not root.exists():
        raise DatasetError(f"data set root {root} does not exist; {LAYOUT_HELP}")
    if not root.is_dir():
        raise DatasetError(f"data set root {root} is not a folder; {LAYOUT_HELP}")
    if split is not None and split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS} or None, got {split!r}")
    wanted = SPLITS if split is None else (split,)
    present = [(name, root / name) for name in wanted if (root / name).is_dir()]
    if split is not None and not present:
        raise DatasetError(f"{root}: no '{split}' folder; {LAYOUT_HELP}")
    if not present:
        hint = ""
        # The Kaggle zip unpacks to chest_xray/chest_xray/...; point at the inner folder.
        nested = [c for c in sorted(root.iterdir()) if c.is_dir() and any((c / s).is_dir() for s in SPLITS)]
        if nested:
            hint = f" (did you mean {nested[0]}?)"
        raise DatasetError(f"{root}: none of the folders {list(SPLITS)} found{hint}; {LAYOUT_HELP}")
    return present


def scan(root: Union[str, Path], split: Optional[str] = None) -> list[Sample]:
    """List the images of a Kaggle-layout data set, sorted by split, label, then file name.

    Args:
        root: folder holding train/, val/ and/or test/.
        split: one split, or None for every split folder present.

    Raises:
        DatasetError: root or label folders missing, or a split without images.

    Files with other suffixes (.DS_Store, notes) and sub-folders are not used; a warning
    lists them, so a half-converted data set does not go unnoticed.
    """
    root = Path(root)
    samples: list[Sample] = []
    skipped: list[Path] = []
    for split_name, split_dir in _split_dirs(root, split):
        found: list[Sample] = []
        for label, label_dir in label_dirs(split_dir).items():
            for path in sorted(label_dir.iterdir()):
                if not path.is_file() or path.suffix.lower() not in SUFFIXES:
                    skipped.append(path)
                    continue
                found.append(Sample(path, label, subtype_of(path.name, label), patient_id(path.name), split_name))
        if not found:
            raise DatasetError(f"{split_dir}: no images in {list(BINARY_LABELS)}; {LAYOUT_HELP}")
        samples.extend(found)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        log.warning("scan %s: skipped %d non-image entries: %s%s", root, len(skipped), shown, more)
    samples.sort(key=lambda s: (SPLITS.index(s.split), BINARY_LABELS.index(s.label), s.path.name))
    return samples


def _by_patient(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.patient].append(sample)
    return groups


def patient_split(
    samples: Sequence[Sample], val_fraction: float, seed: int, stratify: bool = True
) -> tuple[list[Sample], list[Sample]]:
    """Split samples into (train, val) so that no patient is in both.

    About `val_fraction` of the images go to val. With `stratify`, patients are grouped by
    their (most common) subtype and each group is split separately, so label and subtype
    proportions match as closely as whole patients allow. With two or more patients, val is
    never empty. Deterministic for a seed whatever the input order; each list keeps the input
    order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if not samples:
        raise DatasetError("patient_split needs at least one sample")
    groups = _by_patient(samples)
    strata: dict[str, list[str]] = defaultdict(list)
    for patient in sorted(groups):
        if stratify:
            counts = Counter(s.subtype for s in groups[patient])
            key = min(counts, key=lambda k: (-counts[k], k))
        else:
            key = ""
        strata[key].append(patient)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for key in sorted(strata):
        patients = strata[key]
        order = rng.permutation(len(patients))
        target = val_fraction * sum(len(groups[p]) for p in patients)
        taken = 0
        for i in order:
            n = len(groups[patients[i]])
            # Take a patient only when it brings the count closer to the target.
            if abs(taken + n - target) < abs(taken - target):
                val_patients.add(patients[i])
                taken += n
    if not val_patients and len(groups) > 1:
        # Every patient overshot a tiny target: hold out the smallest one rather than nothing.
        val_patients.add(min(sorted(groups), key=lambda p: len(groups[p])))
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    return train, val


def _targets(samples: Sequence[Sample], task: str) -> list[str]:
    labels_for(task)
    if not samples:
        raise DatasetError("no samples given")
    return [s.target(task) for s in samples]


def class_weights(samples: Sequence[Sample], task: str) -> dict[str, float]:
    """Balanced class weights n / (k * n_c), keyed by class name in `labels_for(task)` order.

    Raises `DatasetError` when a class has no samples (its weight would be infinite).
    """
    counts = Counter(_targets(samples, task))
    labels = labels_for(task)
    missing = [label for label in labels if counts[label] == 0]
    if missing:
        raise DatasetError(f"no samples of class(es) {missing} for the {task} task; cannot weight classes")
    n, k = len(samples), len(labels)
    return {label: n / (k * counts[label]) for label in labels}


def balanced_resample(samples: Sequence[Sample], task: str, seed: int) -> list[Sample]:
    """Oversample every class up to the largest one's count; returned shuffled.

    Every original sample is kept; extra copies are whole repeats plus a random subset
    without replacement, so copies are spread evenly. Deterministic for a seed.
    """
    targets = _targets(samples, task)
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for sample, target in zip(samples, targets):
        by_class[target].append(sample)
    largest = max(len(members) for members in by_class.values())
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for label in labels_for(task):
        members = by_class.get(label, [])
        if not members:
            continue
        repeats, rest = divmod(largest, len(members))
        out.extend(members * repeats)
        out.extend(members[i] for i in sorted(rng.choice(len(members), size=rest, replace=False)))
    return [out[i] for i in rng.permutation(len(out))]


def summary(samples: Sequence[Sample], task: str) -> dict:
    """Image and patient counts, overall and per split, per class of `task`.

    Diagnostic, so it never refuses: PNEUMONIA files with no subtype are counted under
    "UNKNOWN" for the multiclass task instead of raising.
    """
    labels = labels_for(task)

    def target(s: Sample) -> str:
        return s.label if task == "binary" else s.subtype

    def block(items: Sequence[Sample]) -> dict:
        counts = Counter(target(s) for s in items)
        names = list(labels) + sorted(set(counts) - set(labels))
        return {
            "images": len(items),
            "patients": len({s.patient for s in items}),
            "labels": {name: counts[name] for name in names},
            "label_patients": {name: len({s.patient for s in items if target(s) == name}) for name in names},
        }

    splits = [name for name in SPLITS if any(s.split == name for s in samples)]
    splits += sorted({s.split for s in samples} - set(SPLITS))
    result = {"task": task, **block(samples)}
    result["splits"] = {name: block([s for s in samples if s.split == name]) for name in splits}
    return result


def labelled_samples(data_dir: Union[str, Path], task: str = "binary") -> tuple[list[Sample], str]:
    """Samples of a labelled folder for evaluation, and which split was used.

    `data_dir` may be a data set root (its test/ split is used when present, else every split)
    or one labelled folder holding NORMAL/ and PNEUMONIA/ (a split, or holdout/ and the like).
    """
    root = Path(data_dir)
    if any((root / label).is_dir() for label in BINARY_LABELS):
        if root.name in SPLITS:
            return scan(root.parent, split=root.name), root.name
        samples = []
        for label, folder in label_dirs(root).items():
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.suffix.lower() in SUFFIXES:
                    samples.append(Sample(path, label, subtype_of(path.name, label), patient_id(path.name), root.name))
        if not samples:
            raise DatasetError(f"{root}: no images in NORMAL/ or PNEUMONIA/")
        return samples, root.name
    if (root / "test").is_dir():
        return scan(root, split="test"), "test"
    return scan(root), "all splits"


def targets(samples: Sequence[Sample], task: str, labels: Sequence[str]) -> np.ndarray:
    """Each sample's class index into a model's `labels`; DatasetError when the labels do not fit."""
    try:
        return np.array([list(labels).index(s.target(task)) for s in samples], dtype=int)
    except (DatasetError, ValueError) as exc:
        raise DatasetError(f"labels of the data do not match the model's {list(labels)}: {exc}") from None
