"""Measure a bundle's heatmaps: localisation on phantoms, the randomisation sanity check, the cost.

    python scripts/measure_heatmaps.py [--model models/default] [--runs /tmp/pneumoedge-default-build/runs]
        [--count 100] [--out docs/heatmap_figures.json] [--record]

Localisation (synthetic: phantoms are not patients): pneumonia phantoms at X-ray size are drawn
with a mask of where the generator put the signs of pneumonia; for each, the ensemble's heatmap
(on the original image) is compared with the mask: the pointing-game hit rate (the map's peak
inside the drawn signs, dilated by 2 % of the image width as tolerance, as in Zhang et al. 2018)
and the IoU of the map's top region (values >= 0.5 of its peak) with the mask.

Sanity (Adebayo et al. 2018), with the Keras runs the bundle was exported from (needs the
[export] extra): maps of each member whose dense head, or last convolution block, was
re-initialised, against the trained member's, as the mean per-image Pearson correlation.

Cost: the same images through `predict_many`, plain and with heatmaps + overlay PNGs written,
whole-run wall time on this machine (CPU flags recorded).

`--record` writes the figures into the bundle's manifest provenance (the manifest is not
checksummed; the member files are not touched).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = ((1024, 1600), (1024, 1600))


def cpu() -> dict:
    flags = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "flags": sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags)}


def phantoms(folder: Path, count: int, seed: int) -> list[tuple[Path, np.ndarray, str]]:
    """Pneumonia phantoms (half bacterial, half viral) as JPEG, each with its sign mask."""
    from pneumoedge.datasets.phantoms import render_phantom_with_signs

    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        kind = "bacteria" if index % 2 == 0 else "virus"
        height, width = int(rng.integers(*SIZE[0])), int(rng.integers(*SIZE[1]))
        image, mask = render_phantom_with_signs(np.random.default_rng(rng.integers(2**32)), kind, height, width)
        path = folder / f"{kind}_{index:03d}.jpeg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append((path, mask, kind))
    return out


def localisation(model, items) -> dict:
    hits, ious, empty = {"bacteria": [], "virus": []}, {"bacteria": [], "virus": []}, 0
    predicted_pneumonia = 0
    for (path, mask, kind), result in zip(items, model.predict_many([p for p, _, _ in items], explain=True, batch_size=4)):
        heat = result.heatmap
        predicted_pneumonia += result.label == "PNEUMONIA"
        if heat is None or heat.max() <= 0:
            empty += 1
            hits[kind].append(False)
            ious[kind].append(0.0)
            continue
        tolerance = max(1, int(0.02 * mask.shape[1]))
        grown = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1,) * 2)) > 0
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        hits[kind].append(bool(grown[y, x]))
        top = heat >= 0.5 * heat.max()
        ious[kind].append(float((top & mask).sum() / max(1, (top | mask).sum())))
    every = hits["bacteria"] + hits["virus"]
    return {
        "images": len(items),
        "predicted_pneumonia": int(predicted_pneumonia),
        "empty_maps": empty,
        "pointing_game_hit_rate": round(float(np.mean(every)), 3),
        "pointing_game_by_kind": {k: round(float(np.mean(v)), 3) for k, v in hits.items() if v},
        "mean_iou_top_region": round(float(np.mean(ious["bacteria"] + ious["virus"])), 3),
        "mean_iou_by_kind": {k: round(float(np.mean(v)), 3) for k, v in ious.items() if v},
        "definition": "hit: the map's peak inside the drawn signs dilated by 2% of the width; IoU: map >= 0.5 of its peak vs the signs",
    }


def sanity(model, runs: Path, items) -> dict:
    import keras

    from pneumoedge.export.gradcam import explain_model, gradcam_reference, pearson
    from pneumoedge.export.onnx_export import load_tensors

    figures = {}
    files = [p for p, _, _ in items[:32]]
    for member in model.members:
        keras_file = runs / member.name / "model.keras"
        if not keras_file.is_file():
            figures[member.name] = {"skipped": f"no Keras run at {keras_file}"}
            continue
        trained = keras.saving.load_model(keras_file, compile=False)
        x = load_tensors(files, member.card.spec)
        reference = gradcam_reference(explain_model(trained, 2), x, 2)
        blocks = sorted({layer.name.split("_")[0] for layer in trained.layers if layer.name.startswith("b") and "_conv" in layer.name})
        result = {"images": len(files), "non_empty_trained_maps": int(sum(m.max() > 0 for m in reference))}
        for what, prefixes in (("head", ("hidden", "probability")), ("last_block", (f"{blocks[-1]}_conv",))):
            copy = keras.models.clone_model(trained)
            copy.set_weights(trained.get_weights())
            rng = np.random.default_rng(0)
            for layer in copy.layers:
                if layer.name.startswith(prefixes):
                    fan_in = int(np.prod(layer.get_weights()[0].shape[:-1]))
                    layer.set_weights([rng.normal(0, np.sqrt(2.0 / fan_in), w.shape).astype("float32") for w in layer.get_weights()])
            redrawn = gradcam_reference(explain_model(copy, 2), x, 2)
            pairs = [(a, b) for a, b in zip(reference, redrawn) if a.max() > 0 or b.max() > 0]
            result[f"mean_pearson_{what}_reinitialised"] = round(float(np.mean([pearson(a, b) for a, b in pairs])), 3) if pairs else None
        figures[member.name] = result
    return figures


def graph_overhead(model, runs: Path, items) -> dict:
    """Model-only latency of each member's graph with the heatmap outputs and exported without them."""
    from pneumoedge.export.onnx_export import export_keras, load_tensors
    from pneumoedge.export.quantization import time_models

    figures = {}
    with tempfile.TemporaryDirectory(prefix="pneumoedge-noheat-") as tmp:
        for member in model.members:
            run = runs / member.name
            if not (run / "model.keras").is_file():
                figures[member.name] = {"skipped": f"no Keras run at {run}"}
                continue
            sample = load_tensors([items[0][0]], member.card.spec)
            plain = export_keras(run, Path(tmp) / f"{member.name}.onnx", spec=member.card.spec, labels=model.labels, heatmaps=False, parity_count=8)
            entry = {}
            for batch in (1, 8):
                with_maps, without = time_models([member.source, plain.onnx_path], sample, batch=batch, rounds=9)
                entry[f"batch_{batch}_ms"] = {"with_heatmap_outputs": round(with_maps, 3), "without": round(without, 3), "ratio": round(with_maps / without, 3)}
            figures[member.name] = entry
    return figures


def cost(model, files: list[Path], work: Path) -> dict:
    from pneumoedge.runtime.folder import overlay_writer

    def run(explain: bool) -> float:
        writer = overlay_writer([work], work / "overlays", 768) if explain else None
        start = time.perf_counter()
        for _ in model.predict_many(files, explain=explain, postprocess=writer):
            pass
        return time.perf_counter() - start

    run(False)  # warm-up: sessions, caches
    plain = min(run(False) for _ in range(3))
    explained = min(run(True) for _ in range(3))
    return {
        "images": len(files),
        "plain_s": round(plain, 3),
        "explain_with_overlays_s": round(explained, 3),
        "plain_images_per_s": round(len(files) / plain, 1),
        "explain_images_per_s": round(len(files) / explained, 1),
        "ratio": round(explained / plain, 2),
        "overlay_side": 768,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/pneumoedge-default-build/runs"))
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "heatmap_figures.json")
    parser.add_argument("--record", action="store_true", help="Write the figures into the bundle's manifest provenance.")
    parser.add_argument("--no-sanity", action="store_true", help="Skip the randomisation check (it needs TensorFlow and the Keras runs).")
    args = parser.parse_args(argv)

    import pneumoedge

    model = pneumoedge.load(args.model, precision="fp32", threads=1)
    if not model.can_explain:
        print(f"error: {model.explain_note}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pneumoedge-heatmaps-") as tmp:
        work = Path(tmp)
        items = phantoms(work, args.count, args.seed)
        figures = {
            "bundle": str(args.model),
            "bundle_name": model.name,
            "members": {m.name: (m.card.explain or {}).get("layer") for m in model.members},
            "machine": cpu(),
            "synthetic": "pneumonia phantoms at 1024-1600 px with drawn sign masks; not patients",
            "localisation": localisation(model, items),
            "cost": cost(model, [p for p, _, _ in items[:64]], work),
        }
        if not args.no_sanity:
            figures["sanity"] = sanity(model, args.runs, items)
            figures["graph_overhead"] = graph_overhead(model, args.runs, items)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(figures, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    if args.record:
        from pneumoedge.atomic import write_json_atomic
        from pneumoedge.bundle import MANIFEST

        manifest = json.loads((args.model / MANIFEST).read_text())
        manifest.setdefault("provenance", {})["heatmaps"] = {k: v for k, v in figures.items() if k in ("localisation", "sanity", "cost", "graph_overhead", "machine", "synthetic")}
        write_json_atomic(args.model / MANIFEST, manifest)
        print(f"recorded in {args.model / MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
