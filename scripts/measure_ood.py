"""Measure a bundle's out-of-distribution flag on held-out chest phantoms and on images that are not chest phantoms.

    python scripts/measure_ood.py [--model BUNDLE] [--per-kind 50] [--heldout 200] [--out docs/ood_figures.json] [--seed 7]

Generates, in a temporary folder (or --work), held-out chest phantoms
(`pneumoedge.datasets.phantoms.generate_dataset` with a seed other than the bundle's training
data, at the default bundle's X-ray size: 1024-1600 px a side, JPEG with a tenth 16-bit PNG)
and `--per-kind` images of each kind of `pneumoedge.datasets.foreign` (natural scenes,
documents, flat grey, noise, X-ray-like limbs and skulls, inverted / blurred / over-exposed
phantoms), runs the model on all of them with `pneumoedge.load(model).predict_many`, and
reports from each prediction's `ood` flag and `ood_score` (1.0 = the flag's threshold):
the false-alarm rate on the held-out phantoms, the detection rate and AUROC per foreign kind
and for all foreign images together, score means and medians, how many reference images the
statistics rest on, the machine and the time taken. Prints a table and writes JSON.
With --sweep N, N held-out phantoms are also scored under graded blur, gain, noise and gamma,
to show how large a change has to be before the flag rises.

Exit status: 0 done; 2 a usage problem, or a model without out-of-distribution statistics
(no score is ever invented); 1 when some image could not be read.

Everything here is synthetic (no real patient, no real radiograph): the figures say how the
flag behaves on these generated images, not how it will behave on a clinic's X-rays.
"""

from __future__ import annotations

import argparse
import logging
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: As scripts/build_default_bundle.py: the default bundle is trained on phantoms of this size.
IMAGE_SIZE = ((1024, 1600), (1024, 1600))
SIXTEEN_BIT_FRACTION = 0.1
FALSE_ALARM_TARGET = 0.02
NOTICE = ("Synthetic images only (generated phantoms and foreign images; no real patient or radiograph). "
          "The out-of-distribution flag is evidence, not a guarantee; results are decision support, never a diagnosis.")

log = logging.getLogger("measure_ood")


# --- metrics (pure numpy; tested in tests/test_ood_metrics.py) ---------------------------------

def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    _, start, counts = np.unique(ordered, return_index=True, return_counts=True)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(start + (counts + 1) / 2.0, counts)
    return ranks


def auroc(negatives: Sequence[float], positives: Sequence[float]) -> Optional[float]:
    """Area under the ROC curve of a score meant to be larger for `positives` (rank-based, ties count half).

    The Mann-Whitney U statistic over n_neg * n_pos pairs; None when either side is empty.
    """
    neg, pos = np.asarray(negatives, dtype=np.float64), np.asarray(positives, dtype=np.float64)
    if neg.size == 0 or pos.size == 0:
        return None
    if not (np.all(np.isfinite(neg)) and np.all(np.isfinite(pos))):
        raise ValueError("scores must be finite")
    ranks = average_ranks(np.concatenate([neg, pos]))
    u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def flag_rate(flags: Sequence[bool]) -> Optional[float]:
    """Share of True in `flags`; None for none."""
    flags = np.asarray(flags, dtype=bool)
    return float(flags.mean()) if flags.size else None


def wilson_interval(k: int, n: int, z: float = 1.959964) -> Optional[tuple[float, float]]:
    """95 % Wilson score interval of a rate k / n (sound at 0 and n, unlike the normal approximation)."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def score_summary(scores: Sequence[float]) -> dict[str, Optional[float]]:
    """Mean, median, min and max of scores (None when empty)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return {"mean": None, "median": None, "min": None, "max": None}
    return {"mean": float(s.mean()), "median": float(np.median(s)), "min": float(s.min()), "max": float(s.max())}


def summarise(groups: dict[str, tuple[list[bool], list[float]]], reference: str = "heldout") -> dict[str, Any]:
    """Figures per group from (flags, scores): flag rate, scores, AUROC against `reference`.

    `groups[reference]` holds the in-distribution images; every other group is foreign, and
    "all_foreign" pools them.
    """
    if reference not in groups:
        raise ValueError(f"no {reference!r} group")
    ref_flags, ref_scores = groups[reference]
    foreign = [k for k in groups if k != reference]
    rows: dict[str, Any] = {reference: {"images": len(ref_flags), "flagged": int(np.sum(ref_flags)), "false_alarm_rate": flag_rate(ref_flags),
                                        "rate_ci95": wilson_interval(int(np.sum(ref_flags)), len(ref_flags)), **score_summary(ref_scores)}}
    pooled_flags: list[bool] = []
    pooled_scores: list[float] = []
    for kind in foreign:
        flags, scores = groups[kind]
        pooled_flags += list(flags)
        pooled_scores += list(scores)
        rows[kind] = {"images": len(flags), "flagged": int(np.sum(flags)), "detection_rate": flag_rate(flags),
                      "rate_ci95": wilson_interval(int(np.sum(flags)), len(flags)), "auroc": auroc(ref_scores, scores), **score_summary(scores)}
    rows["all_foreign"] = {"images": len(pooled_flags), "flagged": int(np.sum(pooled_flags)), "detection_rate": flag_rate(pooled_flags),
                           "rate_ci95": wilson_interval(int(np.sum(pooled_flags)), len(pooled_flags)), "auroc": auroc(ref_scores, pooled_scores), **score_summary(pooled_scores)}
    return rows


# --- the run ------------------------------------------------------------------------------------

def _machine() -> dict[str, Any]:
    import os

    try:
        from pneumoedge.runtime.machine import cpu_info

        cpu = cpu_info().to_dict()
    except ImportError:  # an older checkout without the machine module
        cpu = {"cpu": platform.processor(), "logical_cores": os.cpu_count()}
    import onnxruntime

    return {**cpu, "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "platform": platform.platform()}


def _ood_entries(ensemble: Any) -> list[dict[str, Any]]:
    """Each member's recorded statistics ("ood" in the manifest): counts, threshold, method."""
    described = ensemble.describe().get("out_of_distribution", {}).get("members", {})
    return [{"member": name, **entry} for name, entry in described.items()]


def _training_seed(ensemble: Any) -> Optional[int]:
    """The phantom seed the bundle was trained on, when its provenance names one."""
    manifest = getattr(ensemble, "manifest", None)
    text = str((getattr(manifest, "provenance", None) or {}).get("data_generator", ""))
    match = re.search(r"generate_dataset\(seed=(\d+)", text)
    return int(match.group(1)) if match else None


def _heldout_counts(n: int) -> dict[str, dict[str, int]]:
    normal = n // 2
    bacteria = (n - normal) // 2
    return {"test": {"normal": normal, "bacteria": bacteria, "virus": n - normal - bacteria}}


#: Graded changes of held-out phantoms: family -> levels (blur: sigma in % of the width; gain:
#: pixel values multiplied, clipped; noise: Gaussian sigma in grey levels; gamma: exponent).
SWEEP = {"blur": (0.25, 0.5, 1.0, 2.0), "gain": (1.25, 1.5, 2.0, 3.0), "noise": (5.0, 10.0, 20.0, 40.0), "gamma": (0.5, 0.7, 1.5, 2.5)}
_SWEEP_NAMES = {"blur": "blur sigma {:g}% of width", "gain": "gain x{:g}", "noise": "noise sigma {:g}", "gamma": "gamma {:g}"}


def degrade(img: np.ndarray, family: str, level: float, seed: int = 0) -> np.ndarray:
    """A uint8 image changed by one step of `SWEEP` (deterministic for a seed)."""
    import cv2

    x = img.astype(np.float32)
    if family == "blur":
        x = cv2.GaussianBlur(x, (0, 0), level / 100 * img.shape[1])
    elif family == "gain":
        x = x * level
    elif family == "noise":
        x = x + np.random.default_rng(seed).normal(0, level, img.shape).astype(np.float32)
    elif family == "gamma":
        x = 255 * (x / 255) ** level
    else:
        raise ValueError(f"unknown family {family!r}; families are {sorted(SWEEP)}")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _write_sweep(sources: Sequence[Path], folder: Path) -> list[tuple[str, Path]]:
    """Each source degraded at every step of `SWEEP`, as JPEG; (group, path) pairs."""
    import cv2
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(_SWEEP_NAMES[family].format(level), family, level, i, src) for family, levels in SWEEP.items() for level in levels for i, src in enumerate(sources)]

    def one(job: tuple[str, str, float, int, Path]) -> tuple[str, Path]:
        group, family, level, i, src = job
        out = folder / f"{family}_{level:g}" / (src.stem + ".jpeg")
        out.parent.mkdir(parents=True, exist_ok=True)
        img = degrade(cv2.imread(str(src), cv2.IMREAD_GRAYSCALE), family, level, seed=i)
        cv2.imwrite(str(out), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        return group, out

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, jobs))


def _fail(message: str, code: int = 2) -> int:
    print(f"measure_ood: {message}", file=sys.stderr)
    return code


def measure(args: argparse.Namespace, work: Path) -> int:
    """Generate held-out phantoms and foreign images, score them all, print and write the figures."""
    from pneumoedge.atomic import write_json_atomic
    from pneumoedge.datasets.foreign import FOREIGN_KINDS

    started = time.perf_counter()
    ensemble, failure = _load(args)
    if ensemble is None:
        return failure
    training_seed = _training_seed(ensemble)
    if training_seed is not None and training_seed == args.seed:
        return _fail(f"--seed {args.seed} is the seed of the bundle's training phantoms: held-out images must differ; choose another")
    log.info("generating %d held-out phantoms and %d images of each of %d foreign kinds in %s", args.heldout, args.per_kind, len(FOREIGN_KINDS), work)
    groups_of, foreign_kinds, sweep = _images(args, work)
    generated_s = time.perf_counter() - started
    predict_started = time.perf_counter()
    scores = _score(ensemble, groups_of, foreign_kinds, sweep, args.batch_size)
    predict_s = time.perf_counter() - predict_started
    for line in scores.errors:
        print(f"measure_ood: unreadable: {line}", file=sys.stderr)
    if sum(len(f) for f, _ in scores.groups.values()) == 0:
        return _fail("the model gave no ood_score for any image: it carries no usable out-of-distribution statistics (no score is invented)")
    if scores.unscored:
        print(f"measure_ood: {len(scores.unscored)} ok rows without an ood score (left out of the figures): {', '.join(scores.unscored[:5])}", file=sys.stderr)
    seconds = {"generate": round(generated_s, 1), "predict": round(predict_s, 1), "total": round(time.perf_counter() - started, 1)}
    result, figures, sweep_figures = _result(args, ensemble, scores, sweep, training_seed, seconds, len(groups_of) / predict_s if predict_s > 0 else None)
    _print(result, figures, sweep_figures, len(groups_of))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, result)
        print(f"wrote {args.out}")
    return 1 if scores.errors else 0


def _load(args: argparse.Namespace) -> tuple[Any, int]:
    """(the ensemble, 0), or (None, exit code) when it cannot be loaded or has no statistics."""
    import pneumoedge
    from pneumoedge.bundle import BundleError

    try:
        ensemble = pneumoedge.load(args.model, precision=args.precision, threads=args.threads)
    except (BundleError, OSError, ValueError) as exc:
        return None, _fail(f"cannot load model {args.model or '(default bundle)'}: {exc}")
    if not getattr(ensemble, "can_flag_ood", False):
        return None, _fail(f"{args.model or 'the default bundle'} carries no out-of-distribution statistics: nothing to measure "
                           "(re-export it with statistics; no score is invented)")
    return ensemble, 0


def _images(args: argparse.Namespace, work: Path) -> tuple[list[tuple[str, Path]], list[str], list[tuple[str, Path]]]:
    """(group, file) of every image to score, the foreign kinds, and the sweep's (group, file)."""
    from pneumoedge.datasets.foreign import write_foreign
    from pneumoedge.datasets.phantoms import generate_dataset

    heldout_root = generate_dataset(work / "heldout", counts=_heldout_counts(args.heldout), size=args.size, seed=args.seed,
                                    sixteen_bit_fraction=SIXTEEN_BIT_FRACTION)
    heldout = sorted(p for p in (heldout_root / "test").rglob("*") if p.suffix in (".jpeg", ".png"))
    foreign = write_foreign(work / "foreign", per_kind=args.per_kind, size=args.size, seed=args.seed)
    sweep = _write_sweep([p for p in heldout if p.suffix == ".jpeg"][: args.sweep], work / "sweep") if args.sweep else []
    groups_of = [("heldout", p) for p in heldout] + [(kind, p) for kind, paths in foreign.items() for p in paths] + sweep
    return groups_of, list(foreign), sweep


class _Scores(NamedTuple):
    groups: dict[str, tuple[list[bool], list[float]]]
    by_class: dict[str, tuple[list[bool], list[float]]]
    errors: list[str]
    unscored: list[str]


def _score(ensemble: Any, groups_of: list[tuple[str, Path]], foreign_kinds: list[str], sweep: list[tuple[str, Path]], batch_size: int) -> _Scores:
    """Each group's flags and scores (held-out ones also by class), unreadable files and unscored rows."""
    groups: dict[str, tuple[list[bool], list[float]]] = {"heldout": ([], []), **{k: ([], []) for k in foreign_kinds}, **{g: ([], []) for g, _ in sweep}}
    scores = _Scores(groups, {}, [], [])
    for i, ((group, path), prediction) in enumerate(zip(groups_of, ensemble.predict_many([p for _, p in groups_of], batch_size=batch_size)), 1):
        if prediction.status != "ok":
            scores.errors.append(f"{path.name}: {prediction.error}")
        elif prediction.ood_score is None or prediction.ood is None:
            scores.unscored.append(path.name)
        else:
            groups[group][0].append(bool(prediction.ood))
            groups[group][1].append(float(prediction.ood_score))
            if group == "heldout":
                flags, values = scores.by_class.setdefault(path.parent.name, ([], []))
                flags.append(bool(prediction.ood))
                values.append(float(prediction.ood_score))
        if i % 100 == 0 or i == len(groups_of):
            log.info("%d/%d images scored", i, len(groups_of))
    return scores


def _result(
    args: argparse.Namespace, ensemble: Any, scores: _Scores, sweep: list[tuple[str, Path]], training_seed: Optional[int],
    seconds: dict[str, float], images_per_second: Optional[float],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The JSON record, the figures per group and the sweep's figures."""
    groups = scores.groups
    sweep_groups = {g for g, _ in sweep}
    figures = summarise({k: v for k, v in groups.items() if k not in sweep_groups})
    sweep_figures = summarise({"heldout": groups["heldout"], **{g: groups[g] for g in dict.fromkeys(g for g, _ in sweep)}}) if sweep else {}
    sweep_figures.pop("all_foreign", None)
    describe = ensemble.describe()
    result = {
        "notice": NOTICE,
        "model": str(args.model) if args.model else "models/default (the bundled default model, trained on synthetic phantoms)",
        "model_name": getattr(ensemble, "name", None),
        "members": [m["name"] + f" ({m['precision']})" for m in describe["members"]],
        "ood_method": describe.get("out_of_distribution", {}).get("note"),
        "statistics": _ood_entries(ensemble),
        "flag": "ood is True when ood_score >= 1.0 (the held-out reference images' 99th percentile of distance, per member; weighted mean over members)",
        "heldout_phantoms": {"generator": f"pneumoedge.datasets.phantoms.generate_dataset(seed={args.seed}, counts={_heldout_counts(args.heldout)}, "
                                          f"size={args.size}, sixteen_bit_fraction={SIXTEEN_BIT_FRACTION})",
                             "training_seed": training_seed,
                             "by_class": {k: {"images": len(f), "flagged": int(np.sum(f)), **score_summary(s)} for k, (f, s) in sorted(scores.by_class.items())}},
        "foreign_images": f"pneumoedge.datasets.foreign.write_foreign(per_kind={args.per_kind}, size={args.size}, seed={args.seed})",
        "false_alarm_target": FALSE_ALARM_TARGET,
        "figures": figures,
        **({"sweep": {"what": f"the first {args.sweep} held-out JPEG phantoms changed by one step each: blur sigma in % of the width, "
                              "gain (pixel values multiplied, clipped), Gaussian noise sigma in grey levels, gamma exponent",
                      "figures": {g: v for g, v in sweep_figures.items() if g != "heldout"}}} if sweep else {}),
        "unreadable": len(scores.errors),
        "unscored": len(scores.unscored),
        "machine": _machine(),
        "seconds": seconds,
        "images_per_second": round(images_per_second, 2) if images_per_second else None,
        "command": " ".join(["python scripts/measure_ood.py", *sys.argv[1:]]),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return result, figures, sweep_figures


def _print(result: dict[str, Any], figures: dict[str, Any], sweep_figures: dict[str, Any], images: int) -> None:
    print(format_table(figures))
    if sweep_figures:
        print("\ngraded changes of held-out phantoms:\n" + format_table({g: v for g, v in sweep_figures.items() if g != "heldout"}))
    fa = figures["heldout"]["false_alarm_rate"]
    print(f"false alarms on held-out phantoms: {fa:.1%} (target <= {FALSE_ALARM_TARGET:.0%}); "
          f"statistics: {', '.join(str(e.get('member')) + ': ' + str(e.get('reference_images')) + ' reference images' for e in result['statistics'])}")
    print(f"{images} images in {result['seconds']['total']:.0f} s on {result['machine'].get('cpu')}; {NOTICE}")


def _fmt(value: Optional[float], pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def format_table(figures: dict[str, Any]) -> str:
    """The figures as a Markdown table (one row per group)."""
    lines = ["| images | n | flagged | rate (95 % interval) | AUROC vs held-out | mean score | median score |", "|---|---:|---:|---:|---:|---:|---:|"]
    for group, row in figures.items():
        rate = row.get("false_alarm_rate", row.get("detection_rate"))
        ci = row.get("rate_ci95")
        interval = f" ({ci[0]:.1%}-{ci[1]:.1%})" if ci else ""
        name = "held-out phantoms (false alarms)" if group == "heldout" else group.replace("_", " ")
        lines.append(f"| {name} | {row['images']} | {row['flagged']} | {_fmt(rate, '.1%')}{interval} | {_fmt(row.get('auroc'), '.3f')} "
                     f"| {_fmt(row['mean'], '.2f')} | {_fmt(row['median'], '.2f')} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="Bundle folder or .onnx file (default: the bundled default model).")
    parser.add_argument("--per-kind", type=int, default=50, help="Foreign images of each kind (default 50).")
    parser.add_argument("--heldout", type=int, default=200, help="Held-out chest phantoms (default 200: half normal, a quarter each pneumonia kind).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ood_figures.json", help="JSON file for the figures (default docs/ood_figures.json).")
    parser.add_argument("--seed", type=int, default=7, help="Seed of the generated images; must differ from the bundle's training seed (default 7).")
    parser.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                        help="Every generated image at this size (default: 1024-1600 px a side, as the default bundle's training phantoms).")
    parser.add_argument("--work", type=Path, default=None, help="Keep the generated images in this new folder (default: a temporary folder, deleted).")
    parser.add_argument("--precision", choices=("auto", "default", "fp32", "int8"), default="auto",
                        help="Which members of a bundle run (as pneumoedge infer's --precision; default auto). int8 members carry their own statistics.")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads per session (default: onnxruntime's).")
    parser.add_argument("--batch-size", type=int, default=8, help="Images per model run (default 8).")
    parser.add_argument("--sweep", type=int, default=0, metavar="N",
                        help="Also score N held-out phantoms under graded blur, gain, noise and gamma, to show where the flag starts (default 0: off).")
    parser.add_argument("--verbose", action="store_true", help="Log progress.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.per_kind < 1 or args.heldout < 4 or args.batch_size < 1 or args.sweep < 0:
        return _fail("--per-kind and --batch-size must be at least 1, --heldout at least 4, --sweep at least 0")
    if args.size is not None and min(args.size) < 32:
        return _fail(f"--size {args.size[0]} {args.size[1]}: images need at least 32x32 pixels")
    args.size = IMAGE_SIZE if args.size is None else tuple(args.size)
    if args.model is not None and not args.model.exists():
        return _fail(f"--model {args.model}: no such file or folder")
    if args.work is not None:
        if args.work.exists() and any(args.work.iterdir()):
            return _fail(f"--work {args.work} is not empty; give a new or empty folder")
        args.work.mkdir(parents=True, exist_ok=True)
        return measure(args, args.work)
    with tempfile.TemporaryDirectory(prefix="pneumoedge-ood-") as tmp:
        return measure(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
