"""Loading models: bundle folders (checksummed, configured for this computer) or self-describing ONNX files."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import onnxruntime as ort

from pneumoedge.bundle import ONNX_METADATA_KEY, BundleError, card_from_metadata, check_digest, read_manifest
from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.runtime.machine import file_stat, optimized_graph_file, remember_verified, verified_before
from pneumoedge.runtime.members import LoadedMember, check_input_shape
from pneumoedge.runtime.sessions import commit_optimized, open_model
from pneumoedge.runtime.tuning import resolve, rule
from pneumoedge.site import apply_site

ModelRef = Union[str, Path]


def default_bundle_path() -> Path:
    """The bundled default model: inside the installed wheel, or models/ in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "models" / "default", package.parent / "models" / "default"):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise BundleError("no default bundle found (models/default is missing from this install); pass --model")


def load(
    model: Union[ModelRef, Sequence[ModelRef], None] = None,
    *,
    device: str = "cpu",
    precision: str = "auto",
    threads: Union[int, None, str] = None,
    site: Union[str, Path, None] = None,
) -> Ensemble:
    """Load a bundle folder, or one or more self-describing `.onnx` files, ready to predict.

    Args:
        model: a bundle folder; an `.onnx` path; a list of `.onnx` paths (an ad-hoc ensemble,
            equal weights); or None for the bundled default model.
        device: "cpu", "cuda" (fails clearly when CUDA cannot run) or "auto".
        precision: for bundles: "auto" (this computer's choice: what `pneumoedge tune` measured,
            else int8 only where it passed its accuracy check and the CPU has VNNI/AMX),
            "default" (the manifest's choice), "fp32" or "int8".
        threads: onnxruntime intra-op threads per session (None: its default, every core);
            "auto": this computer's choice for folders (see `pneumoedge.runtime.tuning`).
        site: a site.json (`pneumoedge validate --site-threshold`): decide with this site's
            threshold; refused (`SiteError`, a `BundleError`) when it was made for another bundle.

    The configuration in use and where it came from is `ensemble.configuration`.
    """
    refs = [default_bundle_path()] if model is None else [model] if isinstance(model, (str, Path)) else list(model)
    if not refs:
        raise BundleError("no model given")
    paths = [Path(r) for r in refs]
    if any(p.is_dir() for p in paths):
        if len(paths) != 1:
            raise BundleError("give one bundle folder, or one or more .onnx files, not a mix")
        return _with_site(_load_bundle(paths[0], device, precision, threads), site)
    config = rule(None, model_bytes=max(p.stat().st_size if p.is_file() else 0 for p in paths))
    if threads != "auto":
        config = replace(config, threads=threads, source="user", reason="threads as given")
    members = [_load_onnx(p, device, config.threads) for p in paths]
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        members = [_renamed(m, f"{m.name}_{i}") for i, m in enumerate(members)]
    found = {_metadata_threshold(m.session) for m in members}
    if len(found) == 1 and None not in found:
        threshold, method = found.pop(), "from the models' metadata"
    else:
        threshold, method = 0.5, "default 0.5 (the ONNX files carry no shared threshold)"
    return _with_site(Ensemble(members, threshold=threshold, threshold_method=method, threads=config.threads, configuration=config), site)


def _with_site(ensemble: Ensemble, site: Union[str, Path, None]) -> Ensemble:
    """The ensemble deciding with a site's threshold (`pneumoedge.site`), when one is given."""
    if site is not None:
        apply_site(ensemble, site)
    return ensemble


def _renamed(member: LoadedMember, name: str) -> LoadedMember:
    return LoadedMember(name, member.weight, member.card, member.session, member.source, member.precision)


def _metadata_threshold(session: ort.InferenceSession) -> Optional[float]:
    text = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY, "{}")
    value = json.loads(text).get("threshold")
    return float(value) if isinstance(value, (int, float)) else None


def _load_onnx(path: Path, device: str, threads: Optional[int]) -> LoadedMember:
    if not path.is_file():
        raise BundleError(f"{path}: no such model file or bundle folder")
    session = open_model(path, device, threads)
    card = card_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))
    member = LoadedMember(path.stem, 1.0, card, session, str(path))
    check_input_shape(member)
    return member


def _load_bundle(root: Path, device: str, precision: str, threads: Union[int, None, str]) -> Ensemble:
    manifest = read_manifest(root, verify=False)  # checksums below: only the members loaded
    try:
        config = resolve(manifest, precision=precision, threads=threads, device=device)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    members = []
    for entry in manifest.members_for(config.precision):
        session = _open_verified(entry, device, config.threads)
        member = LoadedMember(entry.name, entry.weight, entry.card, session, str(entry.path), entry.precision)
        check_input_shape(member)
        members.append(member)
    return Ensemble(
        members, threshold=manifest.threshold, threshold_method=manifest.threshold_method, manifest=manifest,
        threads=config.threads, configuration=config,
    )


def _open_verified(entry: Any, device: str, threads: Optional[int]) -> ort.InferenceSession:
    """Open a member from one read of its file, hashing those bytes while the session is built.

    A big member (an 80 MB Xception) costs ~0.2 s to hash: in a thread beside session creation
    (both release the GIL) that time is hidden, and the file is read once, not twice. A big
    member whose very file (inode, size, mtime, ctime) hashed right before is not hashed again,
    and its optimized graph comes from the cache (docs/speed.md).
    """
    size = os.path.getsize(entry.path)
    optimized = optimized_graph_file(entry.sha256, size, device)
    if optimized is not None and optimized.is_file() and verified_before(entry.path, entry.sha256):
        session = open_model(entry.path, device, threads, optimized_cache=optimized)
        commit_optimized(optimized, verified=True)  # a damaged cache file was rebuilt from the trusted file
        return session
    stat_before = file_stat(entry.path)
    try:
        data = Path(entry.path).read_bytes()
    except OSError as exc:
        raise BundleError(f"{entry.path}: cannot read member file: {exc.strerror or exc}") from None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pneumoedge-sha256") as pool:
        digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        try:
            session: Optional[ort.InferenceSession] = open_model(entry.path, device, threads, data=data, optimized_cache=optimized)
            failure = None
        except BundleError as exc:  # a changed file is reported as changed, not as unloadable
            session, failure = None, exc
        actual = digest.result()
    if optimized is not None:
        commit_optimized(optimized, verified=actual == entry.sha256 and failure is None)
    if actual == entry.sha256 and failure is not None:
        raise failure
    if optimized is not None and actual == entry.sha256:
        remember_verified(entry.path, actual, stat_before)
    check_digest(entry.path, entry.sha256, actual)
    return session

