"""site.json: written, read, checked against the bundle, applied without touching the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pneumoedge.bundle import BundleError, read_manifest
from pneumoedge.runtime.loading import load
from pneumoedge.site import SiteError, SiteThreshold, apply_site, bundle_sha256, read_site, site_for, write_site


def _site(bundle: Path, threshold: float = 0.7, **changes) -> SiteThreshold:
    values = dict(threshold=threshold, method=f"fixed:{threshold}", description=f"fixed {threshold} (test)", bundle_name="test-bundle",
                  bundle_sha256=bundle_sha256(bundle), chosen_on={"images": 0}, created="2026-12-07T00:00:00+00:00")
    values.update(changes)
    return SiteThreshold(**values)


def test_round_trip_and_apply(bundle_dir: Path, tmp_path: Path) -> None:
    path = write_site(tmp_path / "site.json", _site(bundle_dir))
    site = read_site(path)
    assert site.threshold == 0.7 and site.path == str(path) and site.bundle_sha256 == bundle_sha256(bundle_dir)
    ensemble = load(bundle_dir, threads=1)
    assert ensemble.threshold == 0.4
    apply_site(ensemble, path)
    assert ensemble.threshold == 0.7 and ensemble.threshold_method.startswith(f"site file {path}")
    assert ensemble.describe()["threshold"] == 0.7
    read_manifest(bundle_dir, verify=True)  # the bundle's checksums still hold


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such site file"),
        ("{not json", "cannot read it"),
        (json.dumps({"format": "something-else"}), "not a pneumoedge site file"),
        (json.dumps({"format": "pneumoedge-site", "format_version": 9}), "version 9"),
        (json.dumps({"format": "pneumoedge-site", "format_version": 1, "threshold": 1.5, "bundle": {"sha256": "x"}}), "0..1"),
        (json.dumps({"format": "pneumoedge-site", "format_version": 1, "threshold": 0.5}), "sha256"),
    ],
)
def test_bad_site_files_are_clear_errors(content, message, tmp_path: Path) -> None:
    path = tmp_path / "site.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SiteError, match=message):
        read_site(path)


def test_site_of_another_or_changed_bundle_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    site = _site(bundle_dir, bundle_sha256="0" * 64)
    with pytest.raises(SiteError, match="validate this bundle"):
        site_for(bundle_dir, site)
    assert issubclass(SiteError, BundleError)  # every verb already reports a BundleError as one line


def test_site_needs_a_binary_bundle_folder(bundle_dir: Path, gray_model: Path, tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="bundle folder"):
        apply_site(load(gray_model, threads=1), _site(bundle_dir))
    with pytest.raises(SiteError, match="not a bundle folder"):
        bundle_sha256(tmp_path)
