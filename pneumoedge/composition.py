"""Composing bundles: members from existing bundles and self-describing ONNX files, in one new bundle.

Each input is one voice with one weight. A bundle given as an input keeps its members'
proportions: member weight = input weight x the member's share of its bundle, so the new
bundle's probability is the weighted mean of the inputs' probabilities. Every member keeps its
own spec (size, colour, layout, decode settings); the runtime still reads each file once.
Member files are copied byte for byte (sha256 checked before and after) and the manifest
records each member's origin. fp32 and int8 members are carried over for every precision
that all inputs have. The new bundle is made by the one bundle builder
(`pneumoedge.export.bundle_builder.build_bundle`), its threshold chosen on labelled images run
through the runtime. onnxruntime and numpy only; never TensorFlow.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from pneumoedge.bundle import (
    ONNX_METADATA_KEY,
    ORIGIN_KEY,
    PRECISIONS,
    QUANTIZATION_KEY,
    BundleError,
    Manifest,
    MemberSource,
    ModelCard,
    card_from_metadata,
    read_manifest,
    sha256_file,
    write_bundle,
)
from pneumoedge.datasets.kaggle import labelled_samples, targets
from pneumoedge.export.bundle_builder import BuildState, BundleOptions, ExportedMember, build_bundle
from pneumoedge.runtime.loading import load
from pneumoedge.thresholds import DEFAULT_THRESHOLD_METHOD, ThresholdRule

log = logging.getLogger(__name__)


@dataclass
class _Part:
    """One member file of an input, before composition."""

    path: Path
    name: str
    precision: str
    weight: float  # within its input (normalised per precision)
    card: ModelCard
    sha256: str
    file: str
    origin: Optional[dict[str, Any]] = None
    ood: Optional[dict[str, Any]] = None  # the member's out-of-distribution statistics entry, "path" resolved


@dataclass
class _Voice:
    """One input: a bundle folder or a self-describing ONNX file."""

    path: Path
    kind: str
    name: str
    card_labels: tuple[str, ...]
    task: str
    threshold: Optional[float]
    threshold_method: str
    default_precision: str
    parts: list[_Part] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def precisions(self) -> set[str]:
        return {p.precision for p in self.parts}


def _read_voice(path: Path) -> _Voice:
    if path.is_dir():
        manifest = read_manifest(path)  # verifies every member's sha256
        voice = _Voice(path, "bundle", manifest.name, manifest.labels, manifest.task, manifest.threshold,
                       manifest.threshold_method, manifest.default_precision, provenance=manifest.provenance)
        for precision in manifest.precisions:
            members = manifest.members_for(precision)
            total = sum(m.weight for m in members)
            for m in members:
                voice.parts.append(_Part(m.path, m.name, precision, m.weight / total, m.card, m.sha256, m.file, m.origin, m.ood))
        return voice
    if path.suffix.lower() != ".onnx" or not path.is_file():
        raise BundleError(f"{path}: not a bundle folder or an .onnx file")
    member = load(path, threads=1).members[0]  # checks the card and the input shape
    metadata = member.session.get_modelmeta().custom_metadata_map
    card = card_from_metadata(metadata, str(path))
    if QUANTIZATION_KEY in metadata:
        raise BundleError(f"{path}: an int8 file cannot be an input on its own (its fp32 twin would be missing); give its bundle")
    threshold = json.loads(metadata[ONNX_METADATA_KEY]).get("threshold")
    threshold = float(threshold) if isinstance(threshold, (int, float)) else None
    origin = json.loads(metadata[ORIGIN_KEY]) if ORIGIN_KEY in metadata else None
    voice = _Voice(path, "onnx", path.stem, card.labels, card.task, threshold,
                   "from the file's metadata" if threshold is not None else "none recorded", "fp32")
    voice.parts.append(_Part(path, path.stem, "fp32", 1.0, card, sha256_file(path), path.name, origin))
    return voice


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "member"


def parse_weights(text: Optional[str], count: int) -> list[float]:
    """'2,1,1' -> [2.0, 1.0, 1.0]: one positive weight per input (equal when None)."""
    if text is None or not str(text).strip():
        return [1.0] * count
    try:
        weights = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise BundleError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != count:
        raise BundleError(f"--weights has {len(weights)} values for {count} inputs: give one per input (a bundle counts as one)")
    if any(not w > 0 for w in weights):
        raise BundleError(f"weights must be positive, got {text!r}")
    return weights


def compose_bundle(
    out: Union[str, Path],
    inputs: Sequence[Union[str, Path]],
    *,
    weights: Optional[Sequence[float]] = None,
    threshold_method: Optional[str] = None,
    validation: Optional[Union[str, Path]] = None,
    name: Optional[str] = None,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[Manifest, list[str]]:
    """Write a new bundle at `out` from bundles and ONNX files; return (manifest, notes).

    Args:
        out: a new folder (refused when it exists and is not empty).
        inputs: bundle folders and self-describing `.onnx` files (from `pneumoedge export`).
        weights: one per input (default equal); a bundle is one voice.
        threshold_method: "sensitivity:T", "youden" or "fixed:X". Without it, the inputs'
            threshold is carried over when they all agree, else chosen on `validation`.
        validation: labelled data (Kaggle layout) to choose the threshold on, with the
            composed ensemble at its default precision, through the runtime.
    """
    out = Path(out)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise BundleError("give at least one input bundle or .onnx file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out}: already exists; choose a new folder (nothing is overwritten)")
    if any(p.resolve() == out.resolve() for p in paths):
        raise BundleError(f"{out}: the output cannot be one of the inputs")
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    if len(weights) != len(paths) or any(not w > 0 for w in weights):
        raise BundleError(f"give one positive weight per input ({len(paths)}), got {weights}")
    voices = [_read_voice(p) for p in paths]
    first = voices[0]
    for voice in voices[1:]:
        if voice.card_labels != first.card_labels or voice.task != first.task:
            raise BundleError(
                f"{voice.path}: labels {','.join(voice.card_labels)} ({voice.task}) differ from {first.path}: "
                f"{','.join(first.card_labels)} ({first.task}); an ensemble averages one label set, in one order"
            )
    notes: list[str] = []
    precisions = [p for p in PRECISIONS if all(p in v.precisions for v in voices)]
    if not precisions:
        raise BundleError("the inputs share no precision (" + "; ".join(f"{v.path}: {sorted(v.precisions)}" for v in voices) + ")")
    for p in PRECISIONS:
        lacking = [str(v.path) for v in voices if p not in v.precisions]
        if p not in precisions and len(lacking) < len(voices):
            notes.append(f"{p} members not carried over: {', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} none")
    default = "int8" if "int8" in precisions and all(v.default_precision == "int8" for v in voices) else precisions[0]
    sources = _member_sources(voices, weights, precisions)
    record: dict[str, Any] = {
        "created_by": "pneumoedge bundle create",
        "synthetic": any(bool(v.provenance.get("synthetic")) for v in voices),
        "notice": "an ensemble composed from the inputs below; each input's own validation applies to it alone",
        "inputs": [
            {"input": str(v.path), "kind": v.kind, "name": v.name, "weight": w, "share": w / sum(weights),
             "threshold": v.threshold, "threshold_method": v.threshold_method, "default_precision": v.default_precision,
             "provenance": v.provenance}
            for v, w in zip(voices, weights)
        ],
        "notes": notes,
    }
    checked = FolderValidation(Path(validation), first.card_labels, first.task, progress) if validation is not None else None
    options = BundleOptions(ood=False, name=name or out.name,
                            threshold=threshold_method or (DEFAULT_THRESHOLD_METHOD if checked is not None else None))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="pneumoedge-compose-") as scratch:
            build_bundle(work, _carried(sources), Path(scratch), labels=first.card_labels, task=first.task, options=options,
                         describe=lambda state: _with_threshold(record, state), validation=checked,
                         fallback=_carried_threshold(voices), carried_default=default, progress=progress)
        if out.exists():
            out.rmdir()  # an empty folder, checked above
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return read_manifest(out), notes


def _member_sources(voices: Sequence[_Voice], weights: Sequence[float], precisions: Sequence[str]) -> list[MemberSource]:
    """Members at each kept precision, weighted so that each input is one voice; unique names."""
    labels = []
    for index, voice in enumerate(voices):
        label = _safe(voice.name)
        labels.append(label if [_safe(v.name) for v in voices].count(label) == 1 else f"{label}_{index + 1}")
    owners: dict[str, set[int]] = {}
    for index, voice in enumerate(voices):
        for part in voice.parts:
            owners.setdefault(_safe(part.name), set()).add(index)
    sources = []
    for index, (voice, weight) in enumerate(zip(voices, weights)):
        for part in voice.parts:
            if part.precision not in precisions:
                continue
            base = _safe(part.name)
            member = base if len(owners[base]) == 1 else f"{labels[index]}-{base}"
            origin = {
                "input": str(voice.path), "kind": voice.kind, "input_name": voice.name, "member": part.name,
                "file": part.file, "sha256": part.sha256, "input_weight": weight, "share_in_input": part.weight,
            }
            if part.origin:
                origin["previous_origin"] = part.origin
            ood = part.ood  # a bundle member's out-of-distribution statistics go with it
            sources.append(MemberSource(part.path, member, part.card.spec, part.precision, weight * part.weight,
                                        part.card.activation, part.card.explain, origin,
                                        ood_file=ood["path"] if ood else None, ood=ood))
    return sources


def _carried(sources: Sequence[MemberSource]) -> list[ExportedMember]:
    """Members for the builder: each name's fp32 file, its other precisions carried as they are."""
    grouped: dict[str, list[MemberSource]] = {}
    for source in sources:
        grouped.setdefault(source.name, []).append(source)
    members = []
    for name, own in grouped.items():
        own.sort(key=lambda s: PRECISIONS.index(s.precision))
        members.append(ExportedMember(name, own[0], None, carried=own[1:]))
    return members


def _carried_threshold(voices: Sequence[_Voice]) -> Callable[[Optional[ThresholdRule]], dict[str, Any]]:
    """Without labelled data: the inputs' threshold when they all agree; otherwise say what to give."""

    def fallback(rule: Optional[ThresholdRule]) -> dict[str, Any]:
        if rule is not None:
            raise BundleError(f"--threshold {rule.text} chooses on labelled data: give --validation DATA_DIR (NORMAL/ and PNEUMONIA/)")
        found = {v.threshold for v in voices}
        if len(found) == 1 and None not in found:
            value = found.pop()
            return {"threshold": value, "method": "carried", "description": f"carried over: every input uses {value:.4g}"}
        listed = ", ".join(f"{v.path.name}: {'none recorded' if v.threshold is None else f'{v.threshold:.4g}'}" for v in voices)
        raise BundleError(
            f"the inputs' thresholds differ ({listed}); give --threshold fixed:X, or --threshold sensitivity:0.95 "
            "(or youden) with --validation DATA_DIR to choose one on labelled data"
        )

    return fallback


def _with_threshold(record: dict[str, Any], state: BuildState) -> dict[str, Any]:
    """The composition's record, with the threshold when it was declared or chosen here."""
    info = state.threshold
    if info is None or info.get("method") == "carried":
        return dict(record)
    if state.validation is not None and "sensitivity" in info:
        info = {**info, "data": state.validation.described, "images": int(len(state.validation.y))}
    return {**record, "threshold": info}


class FolderValidation:
    """Labelled images (Kaggle layout) run through the runtime, as the composed bundle will be."""

    def __init__(self, folder: Path, labels: Sequence[str], task: str, progress: Callable[[str], None]) -> None:
        self.folder, self.labels, self.task, self.progress = folder, tuple(labels), task, progress
        self.described = str(folder)
        self.samples, self.split = labelled_samples(folder, task)
        self.y = targets(self.samples, task, self.labels)

    def tensors_for(self, name: str) -> None:
        return None  # decoded by the runtime, never held in memory

    def probabilities(self, sources: Sequence[MemberSource]) -> np.ndarray:
        """The ensemble of `sources` on the images, through a provisional bundle and `load`."""
        with tempfile.TemporaryDirectory(prefix="pneumoedge-threshold-") as tmp:
            write_bundle(tmp, sources, labels=self.labels, task=self.task, threshold=0.5 if self.task == "binary" else None,
                         threshold_method="provisional", default_precision=sources[0].precision)
            ensemble = load(tmp, threads=1)
            self.progress(f"choosing the threshold on {len(self.samples)} labelled images ({self.split})")
            predictions = list(ensemble.predict_many([s.path for s in self.samples], batch_size=8))
        failed = [p.source for p in predictions if p.status != "ok"]
        if failed:
            raise BundleError(f"{len(failed)} validation images could not be read (first: {failed[0]}); fix or remove them")
        return np.array([[p.probabilities[label] for label in self.labels] for p in predictions], dtype=np.float64)
