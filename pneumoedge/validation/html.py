"""report.html: one self-contained page (images as data URIs, no external URL), readable printed on A4."""

from __future__ import annotations

from html import escape
from typing import Any, Optional

from pneumoedge.validation.plots import INSTALL_HINT

_CSS = """
:root { --ink:#1b1f24; --muted:#57606a; --line:#d0d7de; --warn:#8a4b00; --warnbg:#fff4e0; --bad:#a40e26; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       max-width: 1000px; margin: 0 auto; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 16px 0 6px; }
.muted { color: var(--muted); } .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; word-break: break-all; }
.notice { border: 2px solid var(--warn); background: var(--warnbg); color: var(--warn); padding: 8px 12px; border-radius: 6px;
          font-weight: 600; margin: 12px 0; }
.alert { border-left: 4px solid var(--bad); padding: 6px 12px; margin: 8px 0; background: #fff0f0; }
table { border-collapse: collapse; margin: 6px 0 10px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; }
.plots { display: flex; flex-wrap: wrap; gap: 10px; }
.plots figure { margin: 0; width: 48%; min-width: 300px; } .plots img { width: 100%; height: auto; border: 1px solid var(--line); }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.gallery figure { margin: 0; width: 31%; min-width: 200px; border: 1px solid var(--line); padding: 6px; break-inside: avoid; }
.gallery img { width: 100%; height: auto; }
figcaption { font-size: 12px; }
ul.limits li { margin-bottom: 4px; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  h2 { break-after: avoid; } table, figure, .notice, .alert { break-inside: avoid; }
  .plots figure { width: 48%; min-width: 0; } .gallery figure { width: 31%; min-width: 0; }
  a { color: inherit; text-decoration: none; }
}
"""


def _num(value: Optional[float], digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(estimate: Optional[dict[str, Any]], digits: int = 3) -> str:
    if not estimate or estimate.get("value") is None:
        return "–"
    text = _num(estimate["value"], digits)
    if estimate.get("ci_low") is not None and estimate.get("ci_high") is not None:
        text += f" ({_num(estimate['ci_low'], digits)}–{_num(estimate['ci_high'], digits)})"
    return text


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class=\"num\">{c}</td>" if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(report: dict[str, Any]) -> str:
    """The whole page as a string."""
    bundle, data = report["bundle"], report["data"]
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>Local validation: {escape(bundle['name'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Local validation of {escape(bundle['name'])}</h1>",
        f"<p class=\"muted\">on {escape(data['path'])} · {escape(report['created'])} · pneumoedge {escape(report['pneumoedge'])}</p>",
        f"<div class=\"notice\" role=\"note\">{escape(report['notice'])} These numbers describe agreement with the labels "
        "given, on these images; they do not make any single result certain.</div>",
    ]
    if bundle.get("synthetic") or data.get("synthetic"):
        which = "; ".join(w for w, s in (("the bundle was trained on synthetic phantoms", bundle.get("synthetic")),
                                          ("the images are synthetic phantoms", data.get("synthetic"))) if s)
        parts.append(f"<div class=\"alert\">Demonstration: {escape(which)}, not real patients.</div>")
    parts += _first(report)
    parts += _main_numbers(report)
    parts += _threshold_section(report)
    parts += _precision_section(report)
    parts += _plots_section(report)
    parts += _calibration_section(report)
    parts += _gallery_section(report)
    parts += _files_section(report)
    parts.append("<h2>What this report cannot tell</h2><ul class=\"limits\">")
    parts += [f"<li>{escape(text)}</li>" for text in report["limits"]]
    parts.append("</ul>")
    parts += _provenance(report)
    parts.append(f"<p class=\"notice\">{escape(report['notice'])}</p></body></html>")
    return "\n".join(parts)


def _first(report: dict[str, Any]) -> list[str]:
    """The honest parts up front: how many images, how many could not be judged or read."""
    data, ood = report["data"], report["ood"]
    items = [
        f"<li><b>{report['n']}</b> images classified of {data['listed']} files listed "
        f"({', '.join(f'{escape(k)}: {v}' for k, v in report['per_label'].items())}); labels from {escape(data['label_source'])}.</li>",
        f"<li><b>{data['unreadable']}</b> unreadable (counted, listed below, not in the metrics); "
        f"<b>{data['skipped']}</b> skipped (not image files).</li>",
    ]
    if ood["available"]:
        rate = _num(ood["rate"] * 100 if ood["rate"] is not None else None, 1)
        items.append(f"<li><b>{ood['flagged']}</b> images ({rate} %) flagged <b>out of distribution</b> "
                     "(unlike the model's training images: do not rely on their results). Every metric below is given on all "
                     "images and on the in-distribution ones.</li>")
    else:
        items.append(f"<li>Out-of-distribution flags: not available ({escape(ood['note'])}).</li>")
    sens = report["sensitivity"]
    if sens.get("ci_low") is not None:
        items.append(f"<li>With {report['n']} images the 95 % interval of sensitivity runs from {_num(sens['ci_low'])} to "
                     f"{_num(sens['ci_high'])}: see the precision note for how many images a narrower answer needs.</li>")
    out = ["<h2>Read this first</h2><ul>", *items, "</ul>"]
    if ood["available"] and report["n"] and ood["flagged"] and ood["flagged"] >= report["n"] / 2:
        out.append("<div class=\"alert\">Most images are out of distribution for this model: its numbers here say little "
                   "about how it would do on images like its training data, and the model should not be used on images like these.</div>")
    return out


def _subsets(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    subsets = [("all images", report["subsets"]["all"])]
    if report["subsets"].get("in_distribution") is not None:
        subsets.append(("in distribution", report["subsets"]["in_distribution"]))
    return subsets


def _main_numbers(report: dict[str, Any]) -> list[str]:
    subsets = _subsets(report)
    header = ["", *[f"{name} (n = {s['n']})" for name, s in subsets]]
    out = ["<h2>Numbers with their 95 % intervals</h2>",
           f"<p class=\"muted\">Proportions: {escape(report['interval_method'])}. ROC AUC: {escape(report['roc_auc_method'])}. "
           f"Decision threshold {escape(_num(report['threshold'], 4))} ({escape(report['threshold_source'])}).</p>"]
    if report["bundle"]["task"] == "binary":
        rows = [
            ["sensitivity", *[_ci(s.get("sensitivity")) for _, s in subsets]],
            ["specificity", *[_ci(s.get("specificity")) for _, s in subsets]],
            ["accuracy", *[_ci(s.get("accuracy")) for _, s in subsets]],
            ["ROC AUC", *[_ci(s.get("roc_auc")) for _, s in subsets]],
        ]
        for index, source in ((0, "its sample"), (1, "stated")):
            for key in ("ppv", "npv"):
                values = [(s.get("predictive_values") or [])[index] if len(s.get("predictive_values") or []) > index else None for _, s in subsets]
                if values[0] is None:
                    continue
                prevalence = "each set's" if index == 0 else _num(values[0]["prevalence"])
                rows.append([f"{key.upper()} at {prevalence} prevalence ({source})" if index else f"{key.upper()} at each set's prevalence",
                             *[_ci(v[key]) if v else "–" for v in values]])
        rows.append(["expected calibration error", *[_num(s["calibration"]["ece"]) for _, s in subsets]])
        rows.append(["Brier score", *[_num(s["calibration"]["brier"]) for _, s in subsets]])
        rows.append(["TP / FN / TN / FP", *[("{tp} / {fn} / {tn} / {fp}".format(**s["confusion"]) if s.get("confusion") else "–") for _, s in subsets]])
        out.append(_table(header, rows))
        if report.get("prevalence") is None:
            out.append("<p class=\"muted\">PPV and NPV depend on prevalence: give <code>--prevalence</code> to see them at your clinic's.</p>")
        else:
            out.append("<p class=\"muted\">At a stated prevalence the interval runs from both proportions' lower bounds to both upper bounds.</p>")
    else:
        out.append(_table(header, [["accuracy", *[_ci(s.get("accuracy")) for _, s in subsets]],
                                   ["expected calibration error (top label)", *[_num(s["calibration"]["ece"]) for _, s in subsets]],
                                   ["Brier score (multi-class)", *[_num(s["calibration"]["brier"]) for _, s in subsets]]]))
        for name, subset in subsets:
            if not subset.get("per_class"):
                continue
            out.append(f"<h3>Per class, one vs rest ({escape(name)})</h3>")
            out.append(_table(["class", "sensitivity", "specificity", "ROC AUC", "PPV (sample)", "ECE", "Brier"], [
                [escape(label), _ci(c["sensitivity"]), _ci(c["specificity"]), _ci(c["roc_auc"]), _ci(c["predictive_values"][0]["ppv"]),
                 _num(c["calibration"]["ece"]), _num(c["calibration"]["brier"])]
                for label, c in subset["per_class"].items()]))
    return out


def _threshold_section(report: dict[str, Any]) -> list[str]:
    if report["bundle"]["task"] != "binary":
        return []
    out = ["<h2>Thresholds for target sensitivities</h2>",
           "<p class=\"muted\">For each target, the highest threshold that reaches it on these images, and the specificity it "
           "costs. Chosen on the same images it is measured on: optimistic for new patients.</p>"]
    for name, subset in _subsets(report):
        rows = [[_num(r["target_sensitivity"], 2), _num(r["threshold"], 4), _num(r["sensitivity"]),
                 _num(r["specificity"]) + (f" ({_num(r['specificity_ci'][0])}–{_num(r['specificity_ci'][1])})"
                                           if r.get("specificity_ci") and r["specificity_ci"][0] is not None else "")]
                for r in subset.get("thresholds", [])]
        out.append(f"<h3>{escape(name)}</h3>" + _table(["target sensitivity", "threshold", "sensitivity", "specificity (95 %)"], rows, 0))
    site = report.get("site_threshold")
    if site:
        at = site["at_site_threshold"]
        out.append("<h3>Site threshold written</h3>")
        out.append(f"<p><b>{escape(_num(site['threshold'], 4))}</b> ({escape(site['description'])}) in <code>{escape(site['file'])}</code>, "
                   f"for bundle sha256 <span class=\"mono\">{escape(site['bundle']['sha256'])}</span>. "
                   f"At it: sensitivity {_ci(at['sensitivity'])}, specificity {_ci(at['specificity'])}. "
                   "Use it with <code>pneumoedge infer --site site.json</code>; the bundle stays untouched.</p>")
    return out


def _precision_section(report: dict[str, Any]) -> list[str]:
    note = report["subsets"]["all"].get("precision_note")
    rows = []
    if note:
        rows = [[escape(r["metric"]), _num(r["expected"]), f"{r['cases']} {r['cases_kind']}", _num(r["current_width"]),
                 f"{r['cases_needed']} {r['cases_kind']}", "–" if r["images_needed"] is None else str(r["images_needed"])]
                for r in note["rows"]]
    else:
        for label, c in report["subsets"]["all"].get("per_class", {}).items():
            for r in c["precision_note"]["rows"]:
                rows.append([f"{escape(label)} {escape(r['metric'])}", _num(r["expected"]), f"{r['cases']} cases", _num(r["current_width"]),
                             f"{r['cases_needed']} cases", "–" if r["images_needed"] is None else str(r["images_needed"])])
    if not rows:
        return []
    return [f"<h2>Precision note: images needed for a 95 % interval {escape(_num(report['width'], 2))} wide</h2>",
            "<p class=\"muted\">Wilson interval width at the value measured here; all images at this sample's prevalence. "
            "Set the width with <code>--width</code>.</p>",
            _table(["metric", "value", "cases here", "interval width now", "cases needed", "images needed"], rows)]


def _plots_section(report: dict[str, Any]) -> list[str]:
    out = ["<h2>Plots</h2>"]
    if not report["plots"]:
        out.append(f"<p class=\"alert\">Plots need matplotlib: <code>{escape(INSTALL_HINT)}</code>, then run validate again. "
                   "Every number is in the tables of this page and in report.json.</p>")
        return out
    captions = {"roc": "ROC curve (all images, and in-distribution ones) with the operating point(s).",
                "reliability": "Reliability diagram: mean predicted probability vs observed rate per bin (dot size: images).",
                "scores": "Scores by true label, with the decision threshold.",
                "disagreement": "How much the ensemble's members disagree (largest spread of a probability)."}
    out.append("<div class=\"plots\">")
    for name, uri in report["plots"].items():
        out.append(f"<figure><img src=\"{uri}\" alt=\"{escape(captions.get(name, name))}\"><figcaption>{escape(captions.get(name, name))}</figcaption></figure>")
    out.append("</div>")
    return out


def _calibration_section(report: dict[str, Any]) -> list[str]:
    everything = report["subsets"]["all"]
    out = ["<h2>Calibration and disagreement</h2>"]
    bins = everything["calibration"].get("bins") or []
    if bins:
        out.append(_table(["p bin", "images", "mean p", "observed rate"],
                          [[f"{b['low']:.1f}–{b['high']:.1f}", str(b["count"]), _num(b["mean_probability"]), _num(b["observed_rate"])] for b in bins]))
    d = everything["disagreement"]
    out.append(f"<p>Member disagreement: mean {_num(d['mean'])}, median {_num(d['median'])}, 90th percentile {_num(d['p90'])}, "
               f"max {_num(d['max'])} (0 for a one-member bundle).</p>")
    return out


def _gallery_section(report: dict[str, Any]) -> list[str]:
    gallery = report["gallery"]
    order = "false negatives first" if report["bundle"]["task"] == "binary" else "lowest probability of the true class first"
    out = [f"<h2>Worst errors ({len(gallery['shown'])} of {gallery['errors']}; {order})</h2>"]
    if gallery.get("note"):
        out.append(f"<p class=\"muted\">{escape(gallery['note'])}</p>")
    if not gallery["shown"]:
        out.append("<p>No errors at this threshold.</p>")
        return out
    out.append("<div class=\"gallery\">")
    for item in gallery["shown"]:
        probs = ", ".join(f"p({escape(k)}) {v:.3f}" for k, v in item["probabilities"].items())
        ood = " · out of distribution" if item.get("ood") else ""
        image = f"<img src=\"{item['_data_uri']}\" alt=\"heatmap of {escape(item['path'])}\">" if item.get("_data_uri") else ""
        out.append(f"<figure>{image}<figcaption><b>{escape(item['kind'])}</b>{ood}: truth {escape(item['truth'])}, "
                   f"called {escape(item['label'])}; {probs}<br><span class=\"mono\">{escape(item['path'])}</span></figcaption></figure>")
    out.append("</div>")
    return out


def _files_section(report: dict[str, Any]) -> list[str]:
    out = []
    if report["unreadable"]:
        out.append(f"<h2>Unreadable files ({len(report['unreadable'])})</h2>")
        out.append(_table(["file", "label", "reason"], [[f"<span class=\"mono\">{escape(u['path'])}</span>", escape(u["label"]), escape(u["reason"])]
                                                         for u in report["unreadable"][:200]], 9))
    if report["skipped"]:
        out.append(f"<h2>Skipped, not image files ({len(report['skipped'])})</h2>")
        out.append(_table(["file", "reason"], [[f"<span class=\"mono\">{escape(u['path'])}</span>", escape(u["reason"])] for u in report["skipped"][:200]], 9))
    return out


def _provenance(report: dict[str, Any]) -> list[str]:
    bundle, data = report["bundle"], report["data"]
    rows = [
        ["bundle", escape(bundle["name"]) + f" <span class=\"mono\">{escape(bundle['path'])}</span>"],
        ["bundle sha256 (manifest.json)", f"<span class=\"mono\">{escape(bundle['sha256'])}</span>"],
        ["bundle threshold", f"{_num(bundle['threshold'], 4)} ({escape(bundle['threshold_method'] or '')})"],
        ["ran as", escape(str(bundle.get("configuration") or bundle.get("precision"))) + f" on {escape(bundle['provider'])}"],
        ["data", f"<span class=\"mono\">{escape(data['path'])}</span>, labels from {escape(data['label_source'])}"],
        ["data listing sha256 (listing.tsv)", f"<span class=\"mono\">{escape(data['listing_sha256'])}</span>"],
    ]
    return ["<h2>What was tested</h2>", _table(["", ""], rows, 9),
            "<p class=\"muted\">Every row of predictions.csv is what <code>pneumoedge infer</code> writes for that file.</p>"]
