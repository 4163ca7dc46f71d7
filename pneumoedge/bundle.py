"""Model bundles: a folder with `manifest.json` and member ONNX files, with checksums.

A manifest is data only: loading a bundle reads JSON and ONNX files and never executes code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from pneumoedge.atomic import write_json_atomic
from pneumoedge.preprocessing import PreprocessSpec, SpecError

FORMAT = "pneumoedge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Key in an ONNX file's metadata_props whose value is the JSON of `ModelCard`.
ONNX_METADATA_KEY = "pneumoedge"
#: metadata_props key recording where a wrapped model came from (JSON).
ORIGIN_KEY = "pneumoedge_origin"
#: metadata_props key of an int8 file: the recipe that made it (JSON).
QUANTIZATION_KEY = "pneumoedge_quantization"

TASKS = ("binary", "multiclass")
PRECISIONS = ("fp32", "int8")
ACTIVATIONS = ("none", "sigmoid", "softmax")
#: The extra graph outputs that carry a member's Grad-CAM map (N, h, w) and pooled features
#: (N, C); a card's `explain` names them, the export side adds them, the runtime reads them.
HEATMAP_OUTPUT = "pneumoedge_heatmap"
FEATURES_OUTPUT = "pneumoedge_features"


class BundleError(ValueError):
    """A bundle or model file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ModelCard:
    """What one ONNX model needs to be run correctly: its input spec and how to read its output.

    Binary models output either one column (probability, or logit, of `labels[1]`) or two.
    `activation` is applied by the runtime to the raw output ("none" when it already is a
    probability). `explain`, when the graph carries them, names its extra outputs (see
    `pneumoedge.explain`): {"heatmap_output", "features_output", "layer", "score", "method"}.
    """

    spec: PreprocessSpec
    labels: tuple[str, ...]
    task: str = "binary"
    activation: str = "none"
    explain: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.task not in TASKS:
            raise BundleError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.activation not in ACTIVATIONS:
            raise BundleError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise BundleError(f"labels must be two or more distinct names, got {list(self.labels)}")
        if self.task == "binary" and len(self.labels) != 2:
            raise BundleError(f"a binary task has exactly two labels, got {list(self.labels)}")
        if self.explain is not None and not isinstance(self.explain, dict):
            raise BundleError(f"explain must be an object naming the heatmap outputs, got {self.explain!r}")

    def to_dict(self) -> dict[str, Any]:
        data = {
            "spec": self.spec.to_dict(),
            "labels": list(self.labels),
            "task": self.task,
            "activation": self.activation,
        }
        if self.explain:
            data["explain"] = dict(self.explain)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        try:
            return cls(
                spec=PreprocessSpec.from_dict(data["spec"]),
                labels=tuple(data["labels"]),
                task=data.get("task", "binary"),
                activation=data.get("activation", "none"),
                explain=data.get("explain"),
            )
        except KeyError as exc:
            raise BundleError(f"model description lacks the field {exc.args[0]!r}") from None
        except SpecError as exc:
            raise BundleError(str(exc)) from None


@dataclass(frozen=True)
class Member:
    """One model of a bundle. `path` is resolved against the bundle folder."""

    name: str
    file: str
    sha256: str
    precision: str
    weight: float
    card: ModelCard
    path: Path
    #: Where the member came from (input bundle or file, its sha256); None in older manifests.
    origin: Optional[dict[str, Any]] = None
    #: Out-of-distribution statistics: {"file", "sha256", "threshold", "reference_images", ...}
    #: with "path" resolved; None when the member has none (see `pneumoedge.runtime.ood`).
    ood: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "precision": self.precision,
            "weight": self.weight,
            "spec": self.card.spec.to_dict(),
            "activation": self.card.activation,
            **({"explain": dict(self.card.explain)} if self.card.explain else {}),
            **({"origin": dict(self.origin)} if self.origin is not None else {}),
            **({"ood": {k: v for k, v in self.ood.items() if k != "path"}} if self.ood else {}),
        }


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest, checked."""

    name: str
    task: str
    labels: tuple[str, ...]
    threshold: Optional[float]
    threshold_method: str
    members: tuple[Member, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    default_precision: str = "fp32"
    root: Optional[Path] = None

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if any(m.precision == p for m in self.members))

    def members_for(self, precision: str) -> tuple[Member, ...]:
        """The members to run at `precision` ("fp32", "int8", or "default")."""
        if precision == "default":
            precision = self.default_precision
        chosen = tuple(m for m in self.members if m.precision == precision)
        if not chosen:
            raise BundleError(
                f"bundle {self.root or self.name} has no {precision} members "
                f"(it has: {', '.join(self.precisions) or 'none'})"
            )
        return chosen

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "task": self.task,
            "labels": list(self.labels),
            "threshold": self.threshold,
            "threshold_method": self.threshold_method,
            "default_precision": self.default_precision,
            "members": [m.to_dict() for m in self.members],
            "provenance": self.provenance,
        }


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _require(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise BundleError(f"{where}: missing field {key!r}")
    return data[key]


def read_manifest(bundle_dir: Union[str, Path], *, verify: bool = True) -> Manifest:
    """Read and check a bundle folder's manifest.

    Checks the format and version, the fields, that members share the bundle's labels and
    task, that each member file exists inside the bundle and (with `verify`) that its
    sha256 matches. ONNX input shapes are checked when the runtime opens the sessions.
    """
    root = Path(bundle_dir)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: not a folder (a bundle is a folder holding {MANIFEST})")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{root}: no {MANIFEST}; is this a pneumoedge bundle?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest: {exc}") from None
    where = str(manifest_path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{where}: not a pneumoedge bundle manifest (format must be {FORMAT!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{where}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {version} is newer than this pneumoedge understands "
            f"({FORMAT_VERSION}); upgrade pneumoedge"
        )
    task = _require(data, "task", where)
    labels = tuple(_require(data, "labels", where))
    raw_members = _require(data, "members", where)
    if not isinstance(raw_members, list) or not raw_members:
        raise BundleError(f"{where}: 'members' must be a non-empty list")
    members = []
    for index, raw in enumerate(raw_members):
        members.append(_read_member(root, raw, labels, task, f"{where}: member {index}", verify))
    names = [(m.name, m.precision) for m in members]
    if len(set(names)) != len(names):
        raise BundleError(f"{where}: two members share a name and precision")
    threshold = data.get("threshold")
    if task == "binary":
        if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise BundleError(f"{where}: a binary bundle needs a threshold between 0 and 1, got {threshold!r}")
    default_precision = data.get("default_precision", "fp32")
    manifest = Manifest(
        name=str(data.get("name", root.name)),
        task=task,
        labels=labels,
        threshold=None if threshold is None else float(threshold),
        threshold_method=str(data.get("threshold_method", "unspecified")),
        members=tuple(members),
        provenance=dict(data.get("provenance") or {}),
        default_precision=default_precision,
        root=root,
    )
    manifest.members_for("default")  # the default precision must exist
    return manifest


def _read_member(root: Path, raw: Any, labels: tuple[str, ...], task: str, where: str, verify: bool) -> Member:
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: must be an object")
    file = str(_require(raw, "file", where))
    path = (root / file).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{where}: file {file!r} lies outside the bundle folder")
    if not path.is_file():
        raise BundleError(f"{where}: member file {path} is missing")
    precision = raw.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise BundleError(f"{where} ({file}): precision must be one of {PRECISIONS}, got {precision!r}")
    weight = raw.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or weight <= 0:
        raise BundleError(f"{where} ({file}): weight must be a positive number, got {weight!r}")
    try:
        card = ModelCard(
            spec=PreprocessSpec.from_dict(_require(raw, "spec", where)),
            labels=labels,
            task=task,
            activation=raw.get("activation", "none"),
            explain=raw.get("explain"),
        )
    except (SpecError, BundleError) as exc:
        raise BundleError(f"{where} ({file}): {exc}") from None
    expected = str(_require(raw, "sha256", where)).lower()
    if verify:
        verify_file(path, expected)
    return Member(
        name=str(raw.get("name", Path(file).stem)),
        file=file,
        sha256=expected,
        precision=precision,
        weight=float(weight),
        card=card,
        path=path,
        origin=raw["origin"] if isinstance(raw.get("origin"), dict) else None,
        ood=_read_ood(root, raw.get("ood"), where, file, verify),
    )


def _read_ood(root: Path, raw: Any, where: str, file: str, verify: bool) -> Optional[dict[str, Any]]:
    """A member's out-of-distribution entry, its file inside the bundle and (with `verify`) checksummed."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("file"), str) or not isinstance(raw.get("sha256"), str):
        raise BundleError(f"{where} ({file}): 'ood' must be an object with 'file' and 'sha256'")
    path = (root / raw["file"]).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{where} ({file}): ood file {raw['file']!r} lies outside the bundle folder")
    if not path.is_file():
        raise BundleError(f"{where} ({file}): out-of-distribution statistics {path} are missing")
    if verify:
        verify_file(path, raw["sha256"])
    return {**raw, "path": path}


def verify_file(path: Path, expected: str) -> None:
    """Raise `BundleError` unless `path`'s sha256 is `expected`."""
    check_digest(path, expected, sha256_file(path))


def check_digest(path: Path, expected: str, actual: str) -> None:
    """THE checksum check: raise `BundleError` naming both digests unless `actual` is `expected`.

    For callers that hash the bytes themselves (the runtime hashes while it loads a member).
    """
    if actual != str(expected).lower():
        raise BundleError(
            f"{path}: checksum mismatch (manifest sha256 {str(expected)[:12]}…, file {actual[:12]}…); "
            "the file was changed or corrupted after the bundle was made"
        )


def apply_activation(raw: Any, activation: str) -> np.ndarray:
    """A member's raw output (N, K) as probabilities: what a card's `activation` means (float64)."""
    raw = np.asarray(raw, dtype=np.float64)
    if activation == "none":
        return raw
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-raw))
    if activation == "softmax":
        e = np.exp(raw - raw.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise BundleError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")



@dataclass(frozen=True)
class MemberSource:
    """An ONNX file to put into a new bundle."""

    onnx_path: Path
    name: str
    spec: PreprocessSpec
    precision: str = "fp32"
    weight: float = 1.0
    activation: str = "none"
    explain: Optional[dict[str, Any]] = None
    #: Recorded as the member's "origin" in the manifest (where it came from, its sha256).
    origin: Optional[dict[str, Any]] = None
    #: Out-of-distribution statistics file (`pneumoedge.runtime.ood.OodStats.save`) and what to
    #: record about it; copied into the bundle as `<name>.<precision>.ood.npz`.
    ood_file: Optional[Path] = None
    ood: Optional[dict[str, Any]] = None


def write_bundle(
    out_dir: Union[str, Path],
    members: Sequence[MemberSource],
    *,
    labels: Sequence[str],
    task: str = "binary",
    threshold: Optional[float] = 0.5,
    threshold_method: str = "fixed 0.5",
    provenance: Optional[dict[str, Any]] = None,
    name: Optional[str] = None,
    default_precision: str = "fp32",
) -> Manifest:
    """Copy member ONNX files into `out_dir`, checksum them, write the manifest, and read it back.

    Member files are named `<name>.<precision>.onnx`. The manifest is written last, through a
    temporary file and a rename, so a crash never leaves a folder that looks complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for member in members:
        ModelCard(member.spec, tuple(labels), task, member.activation, member.explain)  # validate early
        file = f"{member.name}.{member.precision}.onnx"
        target = out / file
        if Path(member.onnx_path).resolve() != target.resolve():
            shutil.copyfile(member.onnx_path, target)
        ood = None
        if member.ood_file is not None:
            ood_file = f"{member.name}.{member.precision}.ood.npz"
            if Path(member.ood_file).resolve() != (out / ood_file).resolve():
                shutil.copyfile(member.ood_file, out / ood_file)
            ood = {**{k: v for k, v in (member.ood or {}).items() if k not in ("file", "sha256", "path")},
                   "file": ood_file, "sha256": sha256_file(out / ood_file)}
        entries.append(
            {
                "name": member.name,
                "file": file,
                "sha256": sha256_file(target),
                "precision": member.precision,
                "weight": float(member.weight),
                "spec": member.spec.to_dict(),
                "activation": member.activation,
                **({"explain": dict(member.explain)} if member.explain else {}),
                **({"origin": dict(member.origin)} if member.origin is not None else {}),
                **({"ood": ood} if ood else {}),
            }
        )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name or out.name,
        "task": task,
        "labels": list(labels),
        "threshold": threshold,
        "threshold_method": threshold_method,
        "default_precision": default_precision,
        "members": entries,
        "provenance": provenance or {},
    }
    write_json_atomic(out / MANIFEST, manifest)
    return read_manifest(out)


def card_from_metadata(metadata: dict[str, str], source: str) -> ModelCard:
    """The `ModelCard` stored in an ONNX file's metadata_props (as onnxruntime returns them)."""
    text = metadata.get(ONNX_METADATA_KEY)
    if text is None:
        raise BundleError(
            f"{source}: this ONNX file does not describe its preprocessing (no '{ONNX_METADATA_KEY}' "
            "metadata). Export it with `pneumoedge export MODEL --size H W --color gray|rgb ...` "
            "to declare its spec, or put it in a bundle whose manifest.json declares it."
        )
    try:
        return ModelCard.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise BundleError(f"{source}: unreadable '{ONNX_METADATA_KEY}' metadata: {exc}") from None
    except BundleError as exc:
        raise BundleError(f"{source}: {exc}") from None
