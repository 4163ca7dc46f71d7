"""A site's own decision threshold for a bundle, kept beside it in site.json, the bundle untouched.

`pneumoedge validate --site-threshold` writes it (the threshold, how and on what data it was
chosen, and the sha256 of the bundle's manifest.json, which pins every member's sha256);
`infer --site`, `serve --site`, `listen --site` and `pneumoedge.load(site=)` apply it. A site
file made for another bundle (or for a changed one) is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from pneumoedge.atomic import write_json_atomic
from pneumoedge.bundle import MANIFEST, BundleError, sha256_file

if TYPE_CHECKING:
    from pneumoedge.runtime.ensemble import Ensemble

SITE_FORMAT = "pneumoedge-site"
SITE_FORMAT_VERSION = 1


class SiteError(BundleError):
    """A site file that cannot be read, or that belongs to another bundle (a `BundleError`, reported as one)."""


@dataclass(frozen=True)
class SiteThreshold:
    """A site's threshold for one bundle (identified by the sha256 of its manifest.json)."""

    threshold: float
    method: str
    description: str
    bundle_name: str
    bundle_sha256: str
    chosen_on: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    path: Optional[str] = None

    @property
    def source(self) -> str:
        """One line for results and summaries: where the threshold came from."""
        where = f"site file {self.path}" if self.path else "site threshold"
        return f"{where}: {self.description}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SITE_FORMAT,
            "format_version": SITE_FORMAT_VERSION,
            "threshold": self.threshold,
            "method": self.method,
            "description": self.description,
            "bundle": {"name": self.bundle_name, "sha256": self.bundle_sha256},
            "chosen_on": self.chosen_on,
            "created": self.created,
            "notice": "decision support for clinicians, never a diagnosis; re-validate when the bundle, scanner or population changes",
        }


def bundle_sha256(bundle: Union[str, Path]) -> str:
    """The bundle's identity: sha256 of its manifest.json (which holds every member's sha256)."""
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise SiteError(f"{bundle}: not a bundle folder (no {MANIFEST}); a site threshold belongs to a bundle")
    return sha256_file(path)


def write_site(path: Union[str, Path], site: SiteThreshold) -> Path:
    """Write site.json atomically."""
    return write_json_atomic(path, site.to_dict())


def read_site(path: Union[str, Path]) -> SiteThreshold:
    """Read and check a site.json.

    Raises:
        SiteError: unreadable, not a site file, or a threshold outside 0..1.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteError(f"{path}: no such site file (pneumoedge validate --site-threshold writes one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SiteError(f"{path}: cannot read it as a site file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != SITE_FORMAT:
        raise SiteError(f"{path}: not a pneumoedge site file (format {SITE_FORMAT!r} expected)")
    if data.get("format_version") != SITE_FORMAT_VERSION:
        raise SiteError(f"{path}: site file version {data.get('format_version')!r}; this pneumoedge reads {SITE_FORMAT_VERSION}")
    threshold, bundle = data.get("threshold"), data.get("bundle")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise SiteError(f"{path}: 'threshold' must be a number in 0..1, got {threshold!r}")
    if not isinstance(bundle, dict) or not isinstance(bundle.get("sha256"), str):
        raise SiteError(f"{path}: 'bundle' must name the bundle's sha256")
    return SiteThreshold(
        threshold=float(threshold), method=str(data.get("method", "")), description=str(data.get("description", "")),
        bundle_name=str(bundle.get("name", "")), bundle_sha256=bundle["sha256"], chosen_on=dict(data.get("chosen_on") or {}),
        created=str(data.get("created", "")), path=str(path),
    )


def site_for(bundle: Union[str, Path], site: Union[str, Path, SiteThreshold]) -> SiteThreshold:
    """Read `site` and check that it was made for `bundle` as it is now.

    Raises:
        SiteError: naming both bundles when the site file belongs to another one.
    """
    site = site if isinstance(site, SiteThreshold) else read_site(site)
    actual = bundle_sha256(bundle)
    if actual != site.bundle_sha256:
        raise SiteError(
            f"{site.path or 'site threshold'} was chosen for bundle {site.bundle_name or '?'} "
            f"(sha256 {site.bundle_sha256[:12]}…), not for {bundle} (sha256 {actual[:12]}…); "
            "validate this bundle to get its own site threshold"
        )
    return site


def apply_site(ensemble: "Ensemble", site: Union[str, Path, SiteThreshold]) -> SiteThreshold:
    """Make a loaded bundle's ensemble decide with the site's threshold; return the site.

    Only the loaded ensemble changes (its `threshold` and `threshold_method`); the bundle's
    files and their checksums stay as they are.
    """
    manifest = ensemble.manifest
    if manifest is None or manifest.root is None:
        raise SiteError("a site threshold belongs to a bundle folder; this model was loaded from .onnx files")
    if ensemble.task != "binary":
        raise SiteError(f"{manifest.root}: a multi-class bundle decides by arg-max and takes no site threshold")
    site = site_for(manifest.root, site)
    ensemble.threshold = site.threshold
    ensemble.threshold_method = site.source
    return site
