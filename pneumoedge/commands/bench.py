"""`pneumoedge bench`: how long one image takes on this computer, per member and for the ensemble."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typing_extensions import Annotated

from pneumoedge.commands.options import CLINICAL_NOTE, Device, Precision, Threads, UserError, model_arg, stderr, user_errors
from pneumoedge.benchmarking.bench import BenchSettings, run_bench
from pneumoedge.benchmarking.images import bench_images
from pneumoedge.benchmarking.measure import BenchError


def bench(
    model: Annotated[
        Optional[List[Path]],
        typer.Argument(metavar="MODEL_OR_BUNDLE", help="A bundle folder or .onnx file(s). Default: the bundled model.", show_default=False),
    ] = None,
    images: Annotated[
        Optional[Path],
        typer.Option(help="Folder of images to time. Default: generated phantoms at real X-ray size (1400x1200)."),
    ] = None,
    device: Device = "cpu",
    threads: Threads = None,
    batch: Annotated[int, typer.Option("--batch", help="Images per model run for batched figures and throughput.")] = 8,
    precision: Precision = "auto",
    runs: Annotated[int, typer.Option(help="Timed runs per figure, after warm-up.")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed runs before each timed series.")] = 5,
    json_out: Annotated[
        Optional[Path], typer.Option("--json", help="Write the figures as JSON here ('-': standard output).")
    ] = None,
) -> None:
    """Time a model on this computer: session creation, first inference, model-only latency
    (min/mean/std/p50/p90/p95/p99/max), preprocessing vs model time, end-to-end latency per
    image, folder throughput, peak memory, provider, machine and library versions, and where
    each millisecond of one image goes: decode, preprocess, model, out-of-distribution score,
    heatmap, overlay PNG, result row.

    Figures are only as quiet as the computer: close other heavy programs first.
    """
    with user_errors():
        settings = BenchSettings(device=device.lower(), threads=threads, batch=batch, precision=precision, runs=runs, warmup=warmup)
        try:
            settings.check()
            paths, source, scratch = bench_images(images)
        except BenchError as exc:
            raise UserError(str(exc)) from None
        try:
            report = run_bench(model_arg(model), paths, settings, command=["pneumoedge", *sys.argv[1:]], images_source=source)
        except BenchError as exc:
            raise UserError(str(exc)) from None
        finally:
            if scratch is not None:
                scratch.cleanup()
        if json_out is not None:
            text = json.dumps(report, indent=2) + "\n"
            if str(json_out) == "-":
                sys.stdout.write(text)
            else:
                json_out.write_text(text, encoding="utf-8")
    print_report(report, stderr if json_out is not None and str(json_out) == "-" else Console())
    stderr.print(f"[yellow]{CLINICAL_NOTE}[/]")


def _stats_cells(stats: Optional[dict[str, float]]) -> list[str]:
    if not stats:
        return ["-"] * 5
    return [_ms(stats[k]) for k in ("p50", "mean", "p90", "p99", "max")]


def _ms(value: float) -> str:
    """Milliseconds in at most 6 characters below 1000 s: 2 decimals under 10, 1 under 1000."""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def print_report(report: dict[str, Any], console: Console) -> None:
    """The figures as rich tables."""
    machine, versions, settings = report["machine"], report["versions"], report["settings"]
    console.print(
        f"[bold]pneumoedge bench[/] on {machine['cpu']} ({machine['physical_cores']} cores; "
        f"SIMD {machine.get('simd') or 'not recorded'}), {machine['os']}\n"
        f"onnxruntime {versions['onnxruntime']}, numpy {versions['numpy']}, opencv {versions['opencv']}, "
        f"pneumoedge {versions['pneumoedge']}; provider {report['ensemble']['provider']}\n"
        f"{settings['images']} images ({settings['images_source']}, {settings['megapixels_mean']:.2f} Mpx mean); "
        f"{settings['runs']} runs after {settings['warmup']} warm-up; threads {settings['threads'] or 'default'}",
        highlight=False,
    )
    # Readable in an 80-column terminal: short figure names under a heading row per member,
    # no vertical borders, numbers never wrapped (an over-long member name is cut with "…").
    table = Table(title="latency (ms)", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0))
    table.add_column("figure", no_wrap=True, overflow="ellipsis", max_width=20)
    for column in ("create", "first", "p50", "mean", "p90", "p99", "max"):
        table.add_column(column, justify="right", no_wrap=True, min_width=7)
    for m in report["members"]:
        table.add_row(f"[bold]{m['name']} {m['precision']}[/]")
        table.add_row("  model, batch 1", _ms(m["session_create_ms"]), _ms(m["first_inference_ms"]), *_stats_cells(m["model_only_ms"]))
        if m["model_only_batch_ms"]:
            table.add_row(f"  model, batch {settings['batch']}", "", "", *_stats_cells(m["model_only_batch_ms"]))
        table.add_row("  preprocess", "", "", *_stats_cells(m["preprocess_ms"]))
    e = report["ensemble"]
    table.add_row("[bold]ensemble[/]")
    table.add_row("  read + decode", "", "", *_stats_cells(e["decode_ms"]))
    table.add_row("  tensors, all", "", "", *_stats_cells(e["tensors_ms"]))
    table.add_row("  models, all", "", "", *_stats_cells(e["model_only_ms"]))
    # create = loading the whole model (checksums, all sessions); first = the first predict after it.
    table.add_row("  end to end", _ms(e["load_ms"]), _ms(e["first_inference_ms"]), *_stats_cells(e["end_to_end_ms"]))
    if e.get("explain"):
        table.add_row("  explain + overlay", "", "", *_stats_cells(e["explain"]["end_to_end_ms"]))
    console.print(table)
    if e.get("stages_ms"):
        console.print(_stages_table(e["stages_ms"]))
    split, tp = e["split"], e["throughput"]
    console.print(
        f"time split (medians): decode {split['decode_fraction']:.0%}, preprocess {split['tensors_fraction']:.0%}, "
        f"model {split['model_fraction']:.0%}\n"
        f"folder throughput: {tp['images_per_s']:.1f} images/s ({tp['images']} images, batch {tp['batch']}, {tp['seconds']:.2f} s)\n"
        + _explain_line(e.get("explain"))
        + _ood_line(e.get("ood"))
        + f"peak resident memory: {report['memory']['peak_rss_mb'] or float('nan'):.0f} MiB",
        highlight=False,
    )


#: How each stage is named in the table (the JSON keys of `stages_ms`).
STAGE_NAMES = {"decode": "read + decode", "preprocess": "preprocess (tensors)", "model": "model run(s)",
               "ood": "out-of-distribution score", "heatmap": "heatmap (explain only)",
               "overlay": "overlay PNG (explain only)", "row": "result row"}


def _stages_table(stages: dict[str, Any]) -> Table:
    """Where one image's milliseconds go: each stage's median and share of a plain prediction."""
    plain = sum(v for k, v in stages.items() if v is not None and k not in ("heatmap", "overlay")) or 1.0
    table = Table(title="per image, by stage (batch 1, medians)", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("stage", no_wrap=True)
    table.add_column("ms", justify="right", no_wrap=True)
    table.add_column("of plain", justify="right", no_wrap=True)
    for key, name in STAGE_NAMES.items():
        value = stages.get(key)
        if value is None:
            table.add_row(name, "-", "(not in this model)")
        else:
            table.add_row(name, _ms(value), f"{value / plain:.0%}")
    return table


def _explain_line(explain: Optional[dict[str, Any]]) -> str:
    if not explain:
        return "explain mode: the model carries no heatmaps\n"
    tp = explain["throughput"]
    return (
        f"explain mode (heatmaps + {explain['overlay_side']} px overlay PNG): {explain['end_to_end_ratio']:.2f}x plain end to end; "
        f"{tp['images_per_s']:.1f} images/s writing overlays ({explain['throughput_ratio']:.2f}x plain's time)\n"
    )


def _ood_line(ood: Optional[dict[str, Any]]) -> str:
    if not ood:
        return "out-of-distribution score: the model carries no statistics\n"
    return (
        f"out-of-distribution score: {ood['cost_ms']:.2f} ms per image "
        f"({ood['fraction_of_end_to_end']:.1%} of end to end)\n"
    )


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
