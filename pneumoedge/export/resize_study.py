"""Measure which `resize` name of a PreprocessSpec reproduces which common training pipeline.

    python -m pneumoedge.export.resize_study [IMAGE_FOLDER] [--markdown]

Each pipeline (tf.image.resize with each method, keras.utils.load_img with each PIL filter,
PIL directly) resizes the same decoded 8-bit images; each of our resize names does too,
through `preprocess` with scale 1 (pixels 0..255). For each pipeline the table gives the
closest name and the largest/mean absolute pixel difference (0..255 scale) over all images
and target sizes. Without a folder, phantoms are generated (Kaggle layout) in a temp folder.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pneumoedge.preprocessing import RESIZE_METHODS, PreprocessSpec, preprocess

TARGETS = ((150, 150), (224, 224), (256, 256), (100, 140))


def _pipelines() -> dict[str, Callable[[Path, np.ndarray, tuple[int, int]], np.ndarray]]:
    import tensorflow as tf
    from PIL import Image

    def tf_resize(method: str, antialias: bool = False) -> Callable[[Path, np.ndarray, tuple[int, int]], np.ndarray]:
        def run(path: Path, pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
            x = tf.constant(pixels[:, :, None].astype(np.float32))
            return tf.image.resize(x, size, method=method, antialias=antialias).numpy()[:, :, 0]

        return run

    def keras_load_img(interpolation: str) -> Callable[[Path, np.ndarray, tuple[int, int]], np.ndarray]:
        import keras

        def run(path: Path, pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
            img = keras.utils.load_img(path, color_mode="grayscale", target_size=size, interpolation=interpolation)
            return np.asarray(img, dtype=np.float32)

        return run

    def pil(resample: int) -> Callable[[Path, np.ndarray, tuple[int, int]], np.ndarray]:
        def run(path: Path, pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
            return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), resample=resample), dtype=np.float32)

        return run

    def tf_decode_resize(path: Path, pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        # keras.utils.image_dataset_from_directory: tf.io.decode_image + tf.image.resize(bilinear)
        x = tf.io.decode_image(tf.io.read_file(str(path)), channels=1, expand_animations=False)
        return tf.image.resize(tf.cast(x, tf.float32), size, method="bilinear").numpy()[:, :, 0]

    return {
        "tf.image.resize bilinear": tf_resize("bilinear"),
        "tf.image.resize bilinear antialias=True": tf_resize("bilinear", True),
        "tf.image.resize area": tf_resize("area"),
        "tf.image.resize nearest": tf_resize("nearest"),
        "tf.image.resize bicubic": tf_resize("bicubic"),
        "image_dataset_from_directory (tf decode + bilinear)": tf_decode_resize,
        "keras.utils.load_img nearest (PIL)": keras_load_img("nearest"),
        "keras.utils.load_img bilinear (PIL)": keras_load_img("bilinear"),
        "keras.utils.load_img bicubic (PIL)": keras_load_img("bicubic"),
        "keras.utils.load_img box (PIL)": keras_load_img("box"),
        "PIL Image.resize NEAREST": pil(Image.NEAREST),
        "PIL Image.resize BILINEAR": pil(Image.BILINEAR),
        "PIL Image.resize LANCZOS": pil(Image.LANCZOS),
    }


def measure(files: Sequence[Path], targets: Sequence[tuple[int, int]] = TARGETS) -> list[dict[str, Any]]:
    """For each pipeline: the closest resize name and the max/mean |difference| in 0..255 pixels."""
    from pneumoedge.imageio import read_pixels

    rows = []
    decoded = {f: read_pixels(f) for f in files}
    for name, pipeline in _pipelines().items():
        errors = {method: [] for method in RESIZE_METHODS}
        for f in files:
            pixels = decoded[f]
            if pixels.dtype != np.uint8 or pixels.ndim != 2:
                continue  # 8-bit gray files only: the pipelines differ in how they read 16-bit
            for size in targets:
                theirs = pipeline(f, pixels, size)
                for method in RESIZE_METHODS:
                    spec = PreprocessSpec(height=size[0], width=size[1], color="gray", resize=method, scale=1.0)
                    ours = preprocess(f, spec)[:, :, 0]
                    errors[method].append(np.abs(ours - theirs))
        stats = {m: (float(max(e.max() for e in errs)), float(np.mean([e.mean() for e in errs]))) for m, errs in errors.items() if errs}
        best = min(stats, key=lambda m: (stats[m][0], stats[m][1]))
        rows.append({"pipeline": name, "best": best, "max": stats[best][0], "mean": stats[best][1], "all": stats})
    return rows


def markdown(rows: Sequence[dict[str, Any]], described: str) -> str:
    lines = [
        f"Measured on {described}; targets {', '.join(f'{h}x{w}' for h, w in TARGETS)}; differences in 0..255 pixel units.",
        "",
        "| training pipeline | closest `resize` | max abs diff | mean abs diff | runner-up (max diff) |",
        "|---|---|---:|---:|---|",
    ]
    for row in rows:
        others = sorted((v[0], m) for m, v in row["all"].items() if m != row["best"])
        runner = f"{others[0][1]} ({others[0][0]:.2f})" if others else "-"
        lines.append(f"| {row['pipeline']} | `{row['best']}` | {row['max']:.3f} | {row['mean']:.4f} | {runner} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--count", type=int, default=12)
    args = parser.parse_args(argv)
    from pneumoedge.export.tensors import image_files

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            from pneumoedge.datasets import phantoms

            folder = phantoms.generate_dataset(Path(tmp) / "data", counts={"train": {"normal": 8, "bacteria": 4, "virus": 4}}, size=((300, 520), (300, 520)), seed=11)
        files = [f for f in image_files(folder) if f.suffix.lower() in (".jpeg", ".jpg")][: args.count]
        print(markdown(measure(files), f"{len(files)} 8-bit gray JPEG images ({'phantoms' if args.folder is None else folder}), sizes 300-520 px"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
