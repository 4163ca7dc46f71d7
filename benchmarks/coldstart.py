"""Cold start: a fresh process from launch to its first printed result, and its peak memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

_PNEUMOEDGE = """
    import sys
    import pneumoedge
    model = pneumoedge.load({bundle!r}, precision="int8")
    print(model.predict({image!r}).probability, "tensorflow" in sys.modules)
"""

_KERAS = """
    import numpy as np
    import keras
    from PIL import Image
    paths, specs = {paths!r}, {specs!r}
    if all(paths):
        models = [keras.saving.load_model(p, compile=False) for p in paths]
    else:  # untrained stand-ins of the same architectures
        from pneumoedge.export.architectures import get_architecture
        models = [get_architecture(n).build() for n in {names!r}]
    img = Image.open({image!r}).convert("L")
    probs = [m.predict(np.asarray(img.resize((w, h)), dtype=np.float32)[None, :, :, None] / 255.0, verbose=0)[0, 0] for m, (h, w) in zip(models, specs)]
    print(float(np.mean(probs)))
"""

_TFLITE = """
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    from pneumoedge.preprocessing import PreprocessSpec, preprocess
    probs = []
    for path, (h, w) in zip({paths!r}, {specs!r}):
        it = Interpreter(model_path=path, num_threads={threads})
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        x = preprocess({image!r}, PreprocessSpec(height=h, width=w))[None]
        s, z = inp["quantization"]
        it.set_tensor(inp["index"], np.clip(np.round(x / s + z), -128, 127).astype(np.int8))
        it.invoke()
        s, z = out["quantization"]
        probs.append((float(it.get_tensor(out["index"]).reshape(-1)[0]) - z) * s)
    print(float(np.mean(probs)))
"""


def time_process(command: list[str]) -> dict[str, Any]:
    """Wall time from launch to exit and peak resident memory (MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode != 0:
        return {"error": stderr.strip().splitlines()[-1:] or ["failed"]}
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024.0, "stdout": stdout.strip()[-200:]}


def repeat(command: list[str], times: int, warm: bool) -> dict[str, Any]:
    """Median over `times` launches (after one untimed launch with `warm`: files in the OS cache)."""
    if warm:
        time_process(command)
    runs = [time_process(command) for _ in range(times)]
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    return {
        "seconds_median": float(np.median([r["seconds"] for r in runs])),
        "seconds_min": min(r["seconds"] for r in runs),
        "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in runs])),
        "launches": len(runs),
        "output": runs[-1]["stdout"],
    }


def _cli() -> list[str]:
    script = shutil.which("pneumoedge", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "pneumoedge"]


def measure_all(bundle: Path, image: str, checks: dict, s: dict[str, Any], tflite_dir: Optional[Path] = None) -> dict[str, Any]:
    """Cold starts of pneumoedge (Python API and CLI), the founding Keras way and LiteRT int8."""
    code = lambda text, **kw: [sys.executable, "-c", textwrap.dedent(text.format(**kw))]  # noqa: E731
    times, warm = s["cold_repeats"], not s["quick"]
    result = {
        "pneumoedge_python_int8": repeat(code(_PNEUMOEDGE, bundle=str(bundle), image=image), times, warm),
    }
    if s["quick"]:
        return result
    result["pneumoedge_cli_int8"] = repeat(
        [*_cli(), "infer", image, "-m", str(bundle), "--precision", "int8", "--no-progress"], times, warm
    )
    from pneumoedge.bundle import read_manifest

    specs = {m.name: (m.card.spec.height, m.card.spec.width) for m in read_manifest(bundle).members}
    names = s["models"]
    result["keras_founding"] = repeat(
        code(_KERAS, paths=[checks[n].get("snapshot") for n in names], specs=[specs[n] for n in names], names=names, image=image), times, warm
    )
    if tflite_dir is not None and all((tflite_dir / f"{n}.int8.tflite").is_file() for n in names):
        paths = [str(tflite_dir / f"{n}.int8.tflite") for n in names]
        result["tflite_int8"] = repeat(code(_TFLITE, paths=paths, specs=[specs[n] for n in names], threads=s["threads"], image=image), times, warm)
    return result
