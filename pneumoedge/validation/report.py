"""`validate`: run a bundle on a clinic's labelled images and write report.json, report.html, predictions.csv.

The contract of report.json is documented in docs/validation.md; `FORMAT_VERSION` changes
when a documented key changes meaning or disappears.
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import cv2
import numpy as np

from pneumoedge import __version__
from pneumoedge.atomic import write_atomic, write_json_atomic
from pneumoedge.bundle import BundleError, sha256_file
from pneumoedge.runtime.ensemble import Ensemble
from pneumoedge.runtime.folder import ProgressCallback
from pneumoedge.runtime.loading import load
from pneumoedge.site import SiteThreshold, apply_site, bundle_sha256, write_site
from pneumoedge.thresholds import ThresholdRule, choose, parse
from pneumoedge.validation import plots
from pneumoedge.validation.analysis import TARGETS, analyse
from pneumoedge.validation.collect import Collected, collect
from pneumoedge.validation.data import DataError, Listing, read_labelled

log = logging.getLogger(__name__)

FORMAT = "pneumoedge-validation"
FORMAT_VERSION = 1
NOTICE = "Decision support for clinicians, never a diagnosis."
#: What no number in the report can show; printed in the report and in docs/validation.md.
LIMITS = (
    "Spectrum bias: the numbers hold for images like these. Cases that are easier or harder than the clinic's everyday mix "
    "(only clear-cut pneumonia, no other findings, one scanner) make the model look better or worse than it will be.",
    "Label quality: every number is measured against the labels given (folder names or the CSV). Labels from one reader, "
    "from the report text or without follow-up carry their own error, which these intervals do not include.",
    "Thresholds chosen on these images (the threshold table, --site-threshold) are tuned to them: expect somewhat lower "
    "sensitivity or specificity on new patients; confirm on a second, independent set.",
    "Patients with several images count several times; the intervals assume independent images.",
    "A local validation checks agreement with labels, not patient outcomes; keep monitoring after go-live.",
)


@dataclass
class Validation:
    """What `validate` wrote and the report it wrote."""

    report: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)


def validate(
    bundle: Union[str, Path],
    data: Union[str, Path],
    out: Union[str, Path],
    *,
    device: str = "cpu",
    precision: str = "auto",
    threads: Union[int, None, str] = "auto",
    batch_size: Optional[int] = None,
    workers: Optional[int] = None,
    prevalence: Optional[float] = None,
    width: float = 0.1,
    site: Optional[Union[str, Path]] = None,
    site_threshold: Optional[str] = None,
    gallery: int = 8,
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
    note: Callable[[str], None] = lambda _: None,
) -> Validation:
    """Validate a bundle on labelled data; write the report files into `out`.

    Args:
        bundle: a bundle folder (its manifest's sha256 ties the report and site.json to it), or
            one self-describing .onnx file (its own sha256; no site threshold).
        data: one folder per label, or a CSV of path,label (see `read_labelled`).
        out: the report folder (refused when it holds a report, unless `overwrite`).
        precision, threads, batch_size, workers, device: as `infer` takes them; by default
            the same configuration `infer` would use on this computer.
        prevalence: a prevalence (0..1) to state PPV and NPV at, besides the sample's.
        width: the 95 % interval width the precision note computes the images needed for.
        site: an existing site.json to validate with (monitoring a site threshold on new data).
        site_threshold: `fixed:X`, `sensitivity:S` or `youden`: choose a site threshold on
            these images (all classified ones) and write site.json for `infer --site`.
        gallery: how many of the worst errors to show with their heatmaps.
    """
    bundle, data, out = Path(bundle), Path(data), Path(out)
    rule = _check_arguments(bundle, out, prevalence, width, site, site_threshold, overwrite)
    ensemble = load(bundle, device=device, precision=precision, threads=threads)
    used_site = apply_site(ensemble, site) if site is not None else None
    if rule is not None and ensemble.task != "binary":
        raise DataError("--site-threshold: a multi-class bundle decides by arg-max and takes no threshold")
    listing = read_labelled(data, ensemble.labels)
    if (out / "report.json").exists():  # --overwrite: an earlier report of ours
        _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    configuration = getattr(ensemble, "configuration", None)
    batch = batch_size or (configuration.batch if configuration is not None else 8)
    note(f"running {ensemble.name} on {len(listing.images)} labelled images ({listing.source})")
    run = collect(ensemble, listing, out / "predictions.csv", batch_size=batch, workers=workers, progress=progress)
    write_atomic(out / "listing.tsv", "label\tpath\tbytes\tsha256\tkind\n" + "".join(line + "\n" for line in listing.lines))
    report = _report(ensemble, bundle, data, listing, run, prevalence, width, used_site, configuration)
    files = {"report.json": str(out / "report.json"), "report.html": str(out / "report.html"),
             "predictions.csv": str(out / "predictions.csv"), "listing.tsv": str(out / "listing.tsv")}
    if rule is not None:
        site_record = _choose_site_threshold(rule, run, ensemble, listing, data, report)
        write_site(out / "site.json", site_record)
        files["site.json"] = str(out / "site.json")
        report["site_threshold"] = {**site_record.to_dict(), "file": "site.json",
                                    "at_site_threshold": _at(run, ensemble.labels, site_record.threshold, prevalence, width)}
    report["gallery"] = _gallery(ensemble, run, out / "gallery", gallery)
    report["plots"] = _plots(run, ensemble, report)
    write_json_atomic(out / "report.json", _public(report))
    from pneumoedge.validation.html import render

    write_atomic(out / "report.html", render(report))
    return Validation(report, files)


def _check_arguments(bundle: Path, out: Path, prevalence: Optional[float], width: float, site: Optional[Union[str, Path]],
                     site_threshold: Optional[str], overwrite: bool) -> Optional[ThresholdRule]:
    """Refuse unusable arguments before anything loads; return the parsed --site-threshold rule."""
    if prevalence is not None and not 0.0 < prevalence < 1.0:
        raise DataError(f"--prevalence {prevalence}: give a proportion between 0 and 1 (e.g. 0.3)")
    if not 0.0 < width < 1.0:
        raise DataError(f"--width {width}: give an interval width between 0 and 1 (e.g. 0.1)")
    rule = parse(site_threshold) if site_threshold is not None else None
    if not bundle.is_dir() and not (bundle.is_file() and bundle.suffix.lower() == ".onnx"):
        raise BundleError(f"{bundle}: validate takes a bundle folder (or one self-describing .onnx file)")
    if (rule is not None or site is not None) and not bundle.is_dir():
        raise BundleError(f"{bundle}: a site threshold belongs to a bundle folder, not to a bare .onnx file")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if (out / "report.json").exists() and not overwrite:
        raise DataError(f"--out {out}: already holds a report; use --overwrite or another folder")
    return rule


def _choose_site_threshold(rule: ThresholdRule, run: Collected, ensemble: Ensemble, listing: Listing, data: Path,
                           report: dict[str, Any]) -> SiteThreshold:
    """The site threshold `rule` picks on every classified image, with where and how it was chosen."""
    chosen = choose(rule, run.y == 1, run.probs[:, 1]) if len(run.y) or not rule.needs_data else None
    if chosen is None:
        raise DataError("--site-threshold: no image could be classified to choose on")
    return SiteThreshold(
        threshold=chosen.threshold, method=rule.text,
        description=f"{rule.text} chosen by pneumoedge validate on {len(run.y)} labelled images "
                    f"({listing.source}): sensitivity {chosen.sensitivity:.3f}, specificity {chosen.specificity:.3f} "
                    f"at threshold {chosen.threshold:.4f}",
        bundle_name=ensemble.name, bundle_sha256=report["bundle"]["sha256"],
        chosen_on={"data": str(data), "label_source": listing.source, "listing_sha256": listing.sha256,
                   "images": int(len(run.y)), "subset": "all classified images", "pneumoedge": __version__},
        created=report["created"],
    )


def _clear_previous(out: Path) -> None:
    """Remove what an earlier report in `out` wrote and this run may not rewrite (no stale site.json or heatmaps)."""
    for path in [out / "site.json", *(out / "gallery").glob("[0-9][0-9]-*.png")]:
        path.unlink(missing_ok=True)


def _public(report: dict[str, Any]) -> dict[str, Any]:
    """report.json: the plots named (they are in report.html), no embedded images."""
    public = {k: v for k, v in report.items() if k not in ("plots", "gallery")}
    public["plots"] = sorted(report["plots"])
    gallery = report["gallery"]
    public["gallery"] = {**gallery, "shown": [{k: v for k, v in item.items() if not k.startswith("_")} for item in gallery["shown"]]}
    return public


def _at(run: Collected, labels: Any, threshold: float, prevalence: Optional[float], width: float) -> dict[str, Any]:
    numbers = analyse(run.y, run.probs, labels, threshold=threshold, disagreement=run.disagreement, prevalence=prevalence, width=width)
    return {k: numbers[k] for k in ("threshold", "confusion", "sensitivity", "specificity", "predictive_values") if k in numbers}


def _report(ensemble: Ensemble, bundle: Path, data: Path, listing: Listing, run: Collected, prevalence: Optional[float],
            width: float, site: Optional[SiteThreshold], configuration: Any) -> dict[str, Any]:
    labels = list(ensemble.labels)
    threshold = ensemble.threshold

    def numbers(part: Collected) -> dict[str, Any]:
        return analyse(part.y, part.probs, labels, threshold=threshold, disagreement=part.disagreement, prevalence=prevalence, width=width)

    everything = numbers(run)
    judged = ensemble.can_flag_ood
    flagged = int(sum(1 for v in run.ood if v is True))
    inside = numbers(run.subset(np.array([v is False for v in run.ood], dtype=bool))) if judged else None
    manifest = ensemble.manifest
    synthetic = bool((manifest.provenance or {}).get("synthetic")) if manifest is not None else False
    from pneumoedge.datasets.phantoms import is_synthetic

    data_synthetic = any(is_synthetic(p) for p in (listing.root, listing.root.parent, listing.root.parent.parent))
    report: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "notice": NOTICE,
        "pneumoedge": __version__,
        "bundle": {
            "name": ensemble.name, "path": str(bundle), "sha256": bundle_sha256(bundle) if bundle.is_dir() else sha256_file(bundle), "task": ensemble.task, "labels": labels,
            "threshold": manifest.threshold if manifest is not None else None,
            "threshold_method": manifest.threshold_method if manifest is not None else None,
            "synthetic": synthetic, "precision": getattr(configuration, "precision", None),
            "configuration": configuration.describe() if configuration is not None else None, "provider": ensemble.provider,
        },
        "data": {
            "path": str(data), "labelled_folder": str(listing.root), "label_source": listing.source, "listing_sha256": listing.sha256, "listing_file": "listing.tsv",
            "listed": len(listing.entries), "images": len(listing.images), "classified": int(len(run.y)),
            "unreadable": len(run.unreadable), "skipped": len(run.skipped), "synthetic": data_synthetic,
        },
        "n": int(len(run.y)),
        "per_label": everything["per_label"],
        "threshold": threshold,
        "threshold_source": site.source if site is not None else (("bundle: " if bundle.is_dir() else "model: ") + (ensemble.threshold_method or "") if threshold is not None else "arg-max"),
        "sensitivity": everything["sensitivity"],
        "specificity": everything["specificity"],
        "roc_auc": everything["roc_auc"],
        "roc_auc_method": "DeLong 95 % (normal approximation, clipped to 0..1; none when the classes are perfectly separated, where DeLong's variance is 0); per class one-vs-rest for multi-class",
        "interval_method": "Wilson score 95 % for proportions",
        "ood": {"available": judged, "flagged": flagged if judged else None,
                "rate": (flagged / len(run.y) if len(run.y) else None) if judged else None, "note": ensemble.ood_note},
        "calibration": {"ece": everything["calibration"]["ece"], "brier": everything["calibration"]["brier"]},
        "thresholds": everything["thresholds"],
        "prevalence": prevalence,
        "width": width,
        "subsets": {"all": everything, "in_distribution": inside},
        "unreadable": run.unreadable,
        "skipped": run.skipped,
        "limits": list(LIMITS),
        "targets": list(TARGETS),
    }
    return report


def _gallery(ensemble: Ensemble, run: Collected, folder: Path, count: int) -> dict[str, Any]:
    """The worst errors (false negatives first, then false positives, most confident first) with heatmaps."""
    labels = list(ensemble.labels)
    errors: list[tuple[int, float, int, str]] = []  # (group, sort key, index, kind)
    for i, prediction in enumerate(run.predictions):
        truth = labels[run.y[i]]
        if prediction.label == truth:
            continue
        if ensemble.task == "binary":
            missed = truth == labels[1]
            p = run.probs[i, 1]
            errors.append((0 if missed else 1, p if missed else -p, i, "false negative" if missed else "false positive"))
        else:
            errors.append((0, run.probs[i, run.y[i]], i, f"{truth} called {prediction.label}"))
    errors.sort()
    items = []
    note = "" if ensemble.can_explain else ensemble.explain_note
    for number, (_, _, i, kind) in enumerate(errors[:count], start=1):
        entry, prediction = run.entries[i], run.predictions[i]
        item: dict[str, Any] = {"path": str(entry.path), "truth": entry.label, "label": prediction.label, "kind": kind,
                                "probabilities": prediction.probabilities, "ood": prediction.ood, "overlay": None}
        if ensemble.can_explain:
            try:
                explained = ensemble.predict(entry.path, explain=True)
                ok, png = cv2.imencode(".png", cv2.cvtColor(explained.overlay(640), cv2.COLOR_RGB2BGR))
                if ok:
                    target = folder / f"{number:02d}-{entry.path.name}.png"
                    folder.mkdir(parents=True, exist_ok=True)
                    write_atomic(target, png.tobytes())
                    item["overlay"] = f"gallery/{target.name}"
                    item["_data_uri"] = "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")
            except (ValueError, OSError) as exc:  # an image that read once and not twice: say so, go on
                log.warning("%s: no heatmap for the gallery: %s", entry.path, exc)
        items.append(item)
    return {"errors": len(errors), "shown": items, "note": note}


def _plots(run: Collected, ensemble: Ensemble, report: dict[str, Any]) -> dict[str, str]:
    """name -> PNG data URI; empty without matplotlib (the report then says how to get them)."""
    if not plots.available() or not len(run.y):
        return {}
    labels = list(ensemble.labels)
    figures: dict[str, bytes] = {}
    if ensemble.task == "binary":
        positive = run.y == 1
        p = run.probs[:, 1]
        curves = [("all images", positive, p)]
        inside = np.array([v is False for v in run.ood], dtype=bool)
        if ensemble.can_flag_ood and inside.any():
            curves.append(("in distribution", positive[inside], p[inside]))
        everything = report["subsets"]["all"]
        points = [(f"threshold {report['threshold']:.3f}", everything["sensitivity"]["value"], everything["specificity"]["value"])]
        if "site_threshold" in report:
            at = report["site_threshold"]["at_site_threshold"]
            points.append((f"site threshold {at['threshold']:.3f}", at["sensitivity"]["value"], at["specificity"]["value"]))
        points = [pt for pt in points if pt[1] is not None and pt[2] is not None]
        figures["roc"] = plots.roc_plot(curves, points)
        figures["reliability"] = plots.reliability_plot([("all images", everything["calibration"]["bins"])])
        figures["scores"] = plots.score_plot([(labels[0], p[~positive]), (labels[1], p[positive])], report["threshold"], f"p({labels[1]})")
    else:
        per_class = report["subsets"]["all"]["per_class"]
        figures["roc"] = plots.roc_plot([(label, run.y == k, run.probs[:, k]) for k, label in enumerate(labels)])
        figures["reliability"] = plots.reliability_plot([(label, per_class[label]["calibration"]["bins"]) for label in labels])
    histogram = report["subsets"]["all"]["disagreement"]["histogram"]
    if len(ensemble.members) > 1 and histogram["counts"]:
        figures["disagreement"] = plots.disagreement_plot(histogram["edges"], histogram["counts"])
    return {name: "data:image/png;base64," + base64.b64encode(data).decode("ascii") for name, data in figures.items()}
