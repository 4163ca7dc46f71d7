"""`pneumoedge tune`: measure which precision, threads and batch run a bundle fastest on this computer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from typing_extensions import Annotated

from pneumoedge.commands.options import CLINICAL_NOTE, Device, UserError, stderr, user_errors
from pneumoedge.benchmarking.images import find_images
from pneumoedge.runtime.loading import default_bundle_path
from pneumoedge.runtime.machine import cpu_info


def tune(
    bundle: Annotated[
        Optional[Path], typer.Argument(help="A bundle folder. Default: the bundled model.", show_default=False)
    ] = None,
    budget: Annotated[float, typer.Option(min=1.0, help="Seconds to spend measuring (about; one candidate may finish after it).")] = 30.0,
    images: Annotated[
        Optional[Path], typer.Option(help="Folder of images to time with. Default: generated X-ray-sized phantoms.")
    ] = None,
    device: Device = "cpu",
    save: Annotated[bool, typer.Option(help="Remember the winner for `infer` and `load(precision='auto')`.")] = True,
) -> None:
    """Measure this computer and remember the fastest configuration for a bundle.

    Candidates: fp32 and int8 (int8 only when the bundle's int8 members passed their accuracy
    check), one run per core or one run on all cores, batch 8 or 2; folder throughput through
    the same pipeline as `infer` (decode + models). The winner is stored in your cache folder
    (PNEUMOEDGE_CACHE_DIR, else ~/.cache/pneumoedge), keyed by the bundle's checksum, this CPU
    and its SIMD flags, and the onnxruntime version; the bundle itself is never changed.
    int8 wins only when it is at least 5% faster than fp32.
    """
    from pneumoedge.benchmarking.tune import tune as run_tune

    with user_errors():
        root = bundle or default_bundle_path()
        if not root.is_dir():
            raise UserError(f"{root}: tune needs a bundle folder (a manifest.json with its .onnx members)")
        paths = None
        if images is not None:
            try:
                paths = find_images(images)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        cpu = cpu_info()
        stderr.print(f"tuning {root} on {cpu.model} ({cpu.logical_cores} CPUs; {cpu.flags_text}), about {budget:.0f} s", highlight=False)
        result = run_tune(root, device=device.lower(), budget_s=budget, images=paths, save=save,
                          progress=lambda text: stderr.print(f"  {text}", highlight=False))
    table = Table(title=f"pneumoedge tune ({result.images} images per run, {result.seconds:.0f} s)", title_justify="left")
    for column in ("precision", "threads", "runners", "batch", "images/s", "load"):
        table.add_column(column, justify="left" if column == "precision" else "right")
    winner = (result.choice.precision, result.choice.threads, result.choice.batch)
    for row in sorted(result.measured, key=lambda r: -r["images_per_s"]):
        mark = " *" if (row["precision"], row["threads"], row["batch"]) == winner else ""
        table.add_row(row["precision"] + mark, str(row["threads"]), str(row["runners"]), str(row["batch"]),
                      f"{row['images_per_s']:.1f}", str(row["load_average"]))
    stderr.print(table)
    if result.skipped:
        stderr.print(f"not measured (budget): {len(result.skipped)} candidates; a larger --budget measures them", highlight=False)
    stderr.print(f"chosen: {result.choice.describe()}", highlight=False, soft_wrap=True)
    stderr.print(f"stored in {result.stored}" if result.stored else "not stored (--no-save)", highlight=False, soft_wrap=True)
    stderr.print(f"[yellow]{CLINICAL_NOTE}[/]")


def register(app: typer.Typer) -> None:
    app.command("tune")(tune)
