"""Composing bundles: members from existing bundles and self-describing ONNX files, in one new bundle.

Each input is one voice with one weight. A bundle given as an input keeps its members'
proportions: member weight = input weight x the member's share of its bundle, so the new
bundle's probability is the weighted mean of the inputs' probabilities. Every member keeps its
own spec (size, colour, layout, decode settings); the runtime still reads each file once.
Member files are copied byte for byte (sha256 checked before and after) and the manifest
records each member's origin. fp32 and int8 members are carried over for every precision
that all inputs have. Runtime-only: onnxruntime, numpy; never TensorFlow.
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

from pneumoedge.bundle import (
    ONNX_METADATA_KEY,
    PRECISIONS,
    BundleError,
    Manifest,
    MemberSource,
    ModelCard,
    card_from_metadata,
    read_manifest,
    sha256_file,
    write_bundle,
)

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
    from pneumoedge.runtime.ensemble import load

    member = load(path, threads=1).members[0]  # checks the card and the input shape
    metadata = member.session.get_modelmeta().custom_metadata_map
    card = card_from_metadata(metadata, str(path))
    if "pneumoedge_quantization" in metadata:
        raise BundleError(f"{path}: an int8 file cannot be an input on its own (its fp32 twin would be missing); give its bundle")
    threshold = json.loads(metadata[ONNX_METADATA_KEY]).get("threshold")
    threshold = float(threshold) if isinstance(threshold, (int, float)) else None
    origin = json.loads(metadata["pneumoedge_origin"]) if "pneumoedge_origin" in metadata else None
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
    binary = first.task == "binary"
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
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        threshold, method = None, "argmax (multiclass)"
        manifest = write_bundle(work, sources, labels=first.card_labels, task=first.task, threshold=0.5 if binary else None,
                                threshold_method="provisional", provenance=record, name=name or out.name, default_precision=default)
        if binary:
            threshold, method = _threshold(voices, work, threshold_method, validation, record, progress)
        sources = [MemberSource(work / m.file, m.name, m.card.spec, m.precision, m.weight, m.card.activation, m.card.explain, m.origin,
                                ood_file=m.ood["path"] if m.ood else None, ood=m.ood)
                   for m in manifest.members]
        write_bundle(work, sources, labels=first.card_labels, task=first.task, threshold=threshold, threshold_method=method,
                     provenance=record, name=name or out.name, default_precision=default)
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


def _threshold(voices: Sequence[_Voice], work: Path, method: Optional[str], validation: Optional[Union[str, Path]],
               record: dict[str, Any], progress: Callable[[str], None]) -> tuple[float, str]:
    from pneumoedge.export.errors import ExportError
    from pneumoedge.export.evaluation import DEFAULT_THRESHOLD_METHOD, choose_threshold

    if method is None and validation is None:
        found = {v.threshold for v in voices}
        if len(found) == 1 and None not in found:
            value = found.pop()
            return value, f"carried over: every input uses {value:.4g}"
        listed = ", ".join(f"{v.path.name}: {'none recorded' if v.threshold is None else f'{v.threshold:.4g}'}" for v in voices)
        raise BundleError(
            f"the inputs' thresholds differ ({listed}); give --threshold fixed:X, or --threshold sensitivity:0.95 "
            "(or youden) with --validation DATA_DIR to choose one on labelled data"
        )
    method = method or DEFAULT_THRESHOLD_METHOD
    try:
        if method.startswith("fixed"):
            value = _fixed(method)
            record["threshold"] = {"threshold": value, "method": method, "description": "declared"}
            return value, f"fixed {value:g} (declared)"
        if validation is None:
            raise BundleError(f"--threshold {method} chooses on labelled data: give --validation DATA_DIR (NORMAL/ and PNEUMONIA/)")
        y, p = _validation_probabilities(work, validation, progress)
        chosen = choose_threshold(y, p, method)
    except ExportError as exc:
        raise BundleError(str(exc)) from None
    record["threshold"] = {**chosen, "data": str(validation), "images": int(len(y))}
    return chosen["threshold"], chosen["description"]


def _fixed(method: str) -> float:
    try:
        value = float(method.partition(":")[2])
    except ValueError:
        raise BundleError(f"--threshold {method!r}: write fixed:X with X a number in 0..1") from None
    if not 0.0 <= value <= 1.0:
        raise BundleError(f"--threshold {method!r}: X must lie in 0..1")
    return value


def _validation_probabilities(bundle: Path, data: Union[str, Path], progress: Callable[[str], None]) -> tuple[Any, Any]:
    """The composed ensemble's p(labels[1]) on labelled data, through the runtime."""
    import numpy as np

    from pneumoedge.export.evaluation import _targets, labelled_samples
    from pneumoedge.runtime.ensemble import load

    ensemble = load(bundle, threads=1)
    samples, split = labelled_samples(data, ensemble.task)
    progress(f"choosing the threshold on {len(samples)} labelled images ({split})")
    predictions = list(ensemble.predict_many([s.path for s in samples], batch_size=8))
    failed = [p.source for p in predictions if p.status != "ok"]
    if failed:
        raise BundleError(f"{len(failed)} validation images could not be read (first: {failed[0]}); fix or remove them")
    y = _targets(samples, ensemble.task, ensemble.labels)
    return y, np.array([p.probabilities[ensemble.labels[1]] for p in predictions])


def describe_sources(manifest: Manifest) -> list[dict[str, Any]]:
    """Per member: name, precision, weight, where it came from and its sha256 (for tables)."""
    return [
        {"name": m.name, "precision": m.precision, "weight": m.weight, "input": (m.origin or {}).get("input", ""),
         "sha256": m.sha256, "spec": m.card.spec}
        for m in manifest.members
    ]

