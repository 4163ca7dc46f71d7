"""What the page and `GET /api/v1/model` say about the loaded model (what `pneumoedge info` shows)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from pneumoedge.bundle import sha256_file
from pneumoedge.runtime.ensemble import Ensemble

NOTICE = "Decision support, not a diagnosis."
SYNTHETIC_NOTICE = "Trained on synthetic phantoms: a demonstration, not clinically validated."


def describe_model(ensemble: Ensemble) -> dict[str, Any]:
    """`Ensemble.describe()` plus the bundle's name, provenance and each member's sha256."""
    described = ensemble.describe()
    manifest = ensemble.manifest
    recorded = {str(entry.path): entry.sha256 for entry in manifest.members} if manifest is not None else {}
    for member in described["members"]:
        # A bundle's checksums were verified at load; bare ONNX files are hashed here, once.
        member["sha256"] = recorded.get(member["source"]) or sha256_file(member["source"])
    if manifest is not None:
        described["bundle"] = manifest.root.name
        described["name"] = manifest.name
        described["precisions"] = list(manifest.precisions)
        described["default_precision"] = manifest.default_precision
        described["provenance"] = manifest.provenance
    else:
        described["name"] = "+".join(m["name"] for m in described["members"])
        described["provenance"] = {}
    provenance = described["provenance"] or {}
    described["synthetic"] = bool(provenance.get("synthetic"))
    if described["synthetic"]:
        described["provenance_summary"] = SYNTHETIC_NOTICE
    elif provenance:
        described["provenance_summary"] = str(provenance.get("notice") or provenance.get("created_by") or "recorded in the bundle")
    else:
        described["provenance_summary"] = "no provenance recorded (bare ONNX files): ask who trained this model on what data"
    described["can_explain"] = ensemble.can_explain
    described["explain_note"] = ensemble.explain_note
    described["notice"] = NOTICE
    return _without_paths(described)


def _without_paths(value: Any) -> Any:
    """`value` with every absolute file path cut to its last part: the server's folders are nobody's business.

    Member files, the bundle folder and the folders recorded in provenance (training data,
    parity images, build folders) become bare names (`cnn3_gray150.int8.onnx`, `default`, `data`).
    """
    if isinstance(value, dict):
        return {key: _without_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_paths(item) for item in value]
    if isinstance(value, str):
        if _is_absolute(value):
            return (PureWindowsPath(value) if "\\" in value else PurePosixPath(value)).name
        return _WINDOWS_PATH.sub(r"\1", _POSIX_PATH.sub(r"\1", value))
    return value


# A path inside a sentence: /dir/.../last or C:\dir\...\last (not part of a URL or a ratio).
_POSIX_PATH = re.compile(r"(?<![\w.:/~])[~]?/(?:[\w.+@-]+/)+([\w.+@-]*)")
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\(?:[^\\\s]+\\)*([^\\\s]*)")


def _is_absolute(text: str) -> bool:
    return (text.startswith(("/", "~/")) and "\n" not in text and " " not in text) or PureWindowsPath(text).is_absolute()
