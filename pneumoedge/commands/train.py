"""`pneumoedge train`: train a founding architecture on a Kaggle-layout folder (needs the [export] extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import typer
from rich.console import Console
from rich.table import Table
from typing_extensions import Annotated

from pneumoedge.export.architectures import ARCHITECTURES
from pneumoedge.commands.options import user_errors
from pneumoedge.thresholds import DEFAULT_THRESHOLD_METHOD

_ARCH_HELP = "Architecture: " + "; ".join(f"{name} ({a.description})" for name, a in ARCHITECTURES.items())


def train_command(
    data_dir: Annotated[Path, typer.Argument(help="Kaggle layout root: train/ (and test/) with NORMAL/ and PNEUMONIA/.", show_default=False)],
    arch: Annotated[str, typer.Option("--arch", "-a", help=_ARCH_HELP)] = "cnn3_gray150",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder to create. Default: runs/ARCH.", show_default=False)] = None,
    task: Annotated[str, typer.Option(help="binary (NORMAL/PNEUMONIA, sigmoid) or multiclass (NORMAL/BACTERIAL/VIRAL, softmax).")] = "binary",
    epochs: Annotated[int, typer.Option(min=1, help="Maximum epochs (early stopping may end sooner).")] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    size: Annotated[Optional[Tuple[int, int]], typer.Option(help="Input size override: --size H W.", show_default=False)] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of train/ held out for validation, whole patients at a time.")] = 0.2,
    balance: Annotated[str, typer.Option(help="class_weight, resample (oversample minority classes) or none.")] = "class_weight",
    patience: Annotated[int, typer.Option(min=1, help="Early-stopping patience (epochs without val_loss improvement).")] = 4,
    learning_rate: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-3,
    threshold: Annotated[str, typer.Option(help="Threshold choice on validation: sensitivity:0.95, youden or fixed:0.5.")] = DEFAULT_THRESHOLD_METHOD,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Train without flip/rotation/zoom/contrast augmentation.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the split, weights, shuffling and augmentation.")] = 0,
    decode_reduction: Annotated[int, typer.Option("--decode-reduction", help="Decode JPEGs at 1/N scale (1, 2, 4, 8) in training AND at run time (recorded in the spec): much cheaper for 1-2 Mpx X-rays. PNG/16-bit files are fully decoded.")] = 1,
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="plateau (halve on stalled val_loss) or cosine (decay over --epochs).")] = "plateau",
) -> None:
    """Train a small CNN; write model.keras, spec, history, metrics, split and plots to a run folder.

    Every training tensor comes from the same preprocess() the runtime uses. The training split
    is re-split by patient into train/validation; the decision threshold is chosen on validation.
    """
    with user_errors():
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from pneumoedge.export.training import TrainingOptions, train

        console = Console()
        run_dir = out or Path("runs") / arch
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as progress:
            bar = progress.add_task(f"training {arch}", total=epochs, info="preprocessing images")

            def on_epoch(epoch: int, total: int, logs: dict) -> None:
                info = f"epoch {epoch}: loss {logs.get('loss', 0):.3f} val_loss {logs.get('val_loss', 0):.3f} val_acc {logs.get('val_accuracy', 0):.3f}"
                progress.update(bar, completed=epoch, info=info)

            options = TrainingOptions(
                task=task, epochs=epochs, batch_size=batch_size, seed=seed, val_fraction=val_fraction, balance=balance,
                size=tuple(size) if size else None, patience=patience, learning_rate=learning_rate, threshold_method=threshold,
                augment=not no_augment, decode_reduction=decode_reduction, lr_schedule=lr_schedule,
            )
            result = train(data_dir, arch, run_dir, options, on_epoch=on_epoch)
            progress.update(bar, completed=epochs)
        table = Table(title=f"{arch}: {result.epochs_run} epochs (best {result.best_epoch}), {result.seconds:.0f} s", title_justify="left")
        for column in ("split", "images", "accuracy", "ROC AUC", "sensitivity", "specificity"):
            table.add_column(column)
        for split in ("validation", "test"):
            m = result.metrics.get(split)
            if m:
                table.add_row(split, str(m["images"]), f"{m['accuracy']:.3f}", "-" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}",
                              f"{m.get('sensitivity', float('nan')):.3f}", f"{m.get('specificity', float('nan')):.3f}")
        console.print(table)
        if result.threshold is not None:
            console.print(f"threshold {result.threshold:.4f}: {result.metrics['threshold']['description']}")
        console.print(f"run folder: [bold]{result.run_dir}[/] (model.keras, spec.json, metrics.json, plots/)")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
