"""`pneumoedge export model.onnx`: foreign ONNX classifiers wrapped unchanged, checked, and refused clearly.

The models are built with onnx.helper (tests/foreign_models.py), as torch.onnx.export or
tf2onnx would write them; no TensorFlow and no PyTorch needed (one test uses torch if present).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import pneumoedge
from pneumoedge.cli import app
from pneumoedge.export.quantization import qdq_node_count
from tests.conftest import gradient_image
from tests.foreign_models import cnn, forward, set_opset, softmax

runner = CliRunner()
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGENET = ["--color", "rgb", "--layout", "NCHW", "--scale", "1/255", "--mean", ",".join(map(str, MEAN)),
            "--std", ",".join(map(str, STD)), "--resize", "bilinear", "--labels", "NORMAL,PNEUMONIA", "--head", "logits"]


def invoke(args: list) -> "object":
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def rgb_folder(tmp_path: Path) -> Path:
    """Five PNGs: RGB and gray, sizes that need resizing both ways."""
    root = tmp_path / "xrays"
    root.mkdir()
    cv2.imwrite(str(root / "a.png"), gradient_image(260, 300, 1, channels=3))
    cv2.imwrite(str(root / "b.png"), gradient_image(180, 200, 2, channels=3))
    cv2.imwrite(str(root / "c.png"), gradient_image(224, 224, 3))
    cv2.imwrite(str(root / "d.png"), gradient_image(400, 350, 4))
    cv2.imwrite(str(root / "e.png"), gradient_image(100, 90, 5, channels=3))
    return root


def numpy_pipeline(path: Path) -> np.ndarray:
    """torchvision-style preprocessing written out by hand: RGB, bilinear 224, /255, ImageNet mean/std, CHW."""
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    rgb = np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels[:, :, ::-1]
    x = cv2.resize(rgb.astype(np.float32), (224, 224), interpolation=cv2.INTER_LINEAR)
    x = (x * np.float32(1 / 255) - np.float32(MEAN)) / np.float32(STD)
    return x.transpose(2, 0, 1)


def test_nchw_imagenet_logits_model_through_infer_equals_a_numpy_pipeline(tmp_path: Path, rgb_folder: Path) -> None:
    source = cnn(tmp_path / "torch_like.onnx", size=(224, 224), channels=3, stride=4)
    wrapped = tmp_path / "wrapped.onnx"
    result = invoke(["export", source, "--out", wrapped, "--size", 224, 224, *IMAGENET, "--images", rgb_folder])
    assert result.exit_code == 0, result.output
    out = tmp_path / "results.jsonl"
    result = invoke(["infer", rgb_folder, "--model", wrapped, "--out", out])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    for name, row in rows.items():
        expected = softmax(forward(numpy_pipeline(rgb_folder / name)[None], channels=3, stride=4))[0]
        assert row["status"] == "ok"
        assert abs(row["probabilities"]["PNEUMONIA"] - expected[1]) < 1e-6, name
        assert abs(row["probabilities"]["NORMAL"] - expected[0]) < 1e-6, name


def test_wrapped_file_is_the_original_graph_plus_metadata(tmp_path: Path) -> None:
    source = cnn(tmp_path / "m.onnx", size=(64, 64), channels=3, classes=3, head="softmax")
    plain, explained = tmp_path / "plain.onnx", tmp_path / "explained.onnx"
    common = ["--size", 64, 64, "--color", "rgb", "--layout", "NCHW", "--labels", "A,B,C", "--head", "softmax"]
    assert invoke(["export", source, "--out", plain, *common, "--no-heatmap"]).exit_code == 0
    result = invoke(["export", source, "--out", explained, *common])
    assert result.exit_code == 0, result.output
    original = onnx.load(str(source))
    without = onnx.load(str(plain))
    # Without heatmaps: the graph protobuf is byte-identical; only metadata_props were added.
    assert without.graph.SerializeToString(deterministic=True) == original.graph.SerializeToString(deterministic=True)
    assert {p.key for p in without.metadata_props} == {"pneumoedge", "pneumoedge_origin"}
    del without.metadata_props[:]
    assert without.SerializeToString(deterministic=True) == original.SerializeToString(deterministic=True)
    # With heatmaps: every original node, initializer and output is still there, unchanged and first.
    grown = onnx.load(str(explained))
    n = len(original.graph.node)
    assert [x.SerializeToString() for x in grown.graph.node[:n]] == [x.SerializeToString() for x in original.graph.node]
    assert all(node.name.startswith("pneumoedge_") for node in grown.graph.node[n:])
    assert [o.name for o in grown.graph.output] == ["probs", "pneumoedge_heatmap", "pneumoedge_features"]
    card = json.loads({p.key: p.value for p in grown.metadata_props}["pneumoedge"])
    assert card["explain"]["heatmap_output"] == "pneumoedge_heatmap" and card["spec"]["layout"] == "NCHW"
    origin = json.loads({p.key: p.value for p in grown.metadata_props}["pneumoedge_origin"])
    assert origin["sha256"] == pneumoedge.bundle.sha256_file(source)
    # Output 0 of all three files, bit for bit, on the same tensors (default onnxruntime options).
    x = np.random.default_rng(1).normal(size=(7, 3, 64, 64)).astype(np.float32)
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["probs"], {"input": x})[0] for p in (source, plain, explained)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_fixed_batch_of_one_runs_a_folder_image_by_image(tmp_path: Path, rgb_folder: Path) -> None:
    source = cnn(tmp_path / "b1.onnx", size=(32, 32), channels=1, batch=1, pool="flatten", head="softmax")
    wrapped = tmp_path / "b1w.onnx"
    result = invoke(["export", source, "--out", wrapped, "--size", 32, 32, "--color", "gray", "--layout", "NCHW",
                     "--head", "softmax", "--labels", "NORMAL,PNEUMONIA"])
    assert result.exit_code == 0, result.output
    assert "batch fixed 1" in result.output and "heatmaps not available" in result.output.replace("\n", " ")
    ensemble = pneumoedge.load(wrapped, threads=1)
    assert ensemble.members[0].dynamic_batch is False
    files = sorted(rgb_folder.iterdir())
    many = list(ensemble.predict_many(files, batch_size=4))
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    for path, prediction in zip(files, many):
        tensor = pneumoedge.preprocess(path, ensemble.members[0].card.spec)[None]
        expected = session.run(None, {"input": tensor})[0][0]
        assert prediction.status == "ok"
        assert prediction.probabilities["PNEUMONIA"] == pytest.approx(float(expected[1]), abs=1e-7)
    out = tmp_path / "r.csv"
    assert invoke(["infer", rgb_folder, "--model", wrapped, "--out", out, "--batch", 4]).exit_code == 0
    assert len(out.read_text().splitlines()) == 1 + len(files)


def _two_outputs(tmp: Path) -> Path:
    return cnn(tmp / "two_out.onnx", second_output=True)


REFUSALS = [
    ("two-inputs", lambda t: cnn(t / "m.onnx", second_input=True), {}, "2 inputs (input, mask)"),
    ("width-mismatch", lambda t: cnn(t / "m.onnx", classes=3), {}, "3 output units but 2 labels"),
    ("softmax-on-logits", lambda t: cnn(t / "m.onnx", head="logits"), {"--head": "softmax"}, "cannot be the declared head"),
    ("size-contradicts", lambda t: cnn(t / "m.onnx"), {"--size": (64, 64)}, "--size H W and --color must match the graph"),
    ("layout-hint", lambda t: cnn(t / "m.onnx", layout="NHWC"), {}, "use --layout NHWC"),
    ("opset-too-new", lambda t: set_opset(cnn(t / "m.onnx"), 30), {}, "opset 30, which onnxruntime"),
    ("not-onnx", lambda t: (t / "m.onnx").write_text("this is a CSV file, not a model\n") and t / "m.onnx", {}, "not an ONNX model"),
    ("empty-file", lambda t: (t / "m.onnx").write_bytes(b"") or t / "m.onnx", {}, "not an ONNX model"),
    ("two-outputs", _two_outputs, {}, "pneumoedge reads one"),
    ("fixed-batch-4", lambda t: cnn(t / "m.onnx", batch=4), {}, "batch axis is fixed at 4"),
    ("missing-size", lambda t: cnn(t / "m.onnx"), {"--size": None}, "--size H W"),
    ("out-is-source", lambda t: cnn(t / "out.onnx"), {}, "the original is never overwritten"),
    ("int8-needs-calibration", lambda t: cnn(t / "m.onnx"), {"--out": "bundle", "--int8": True}, "--int8 needs --calibration"),
]


@pytest.mark.parametrize("make, changes, message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_are_one_line_exit_2(tmp_path: Path, make, changes: dict, message: str) -> None:
    source = make(tmp_path)
    before = source.read_bytes()
    options = {"--out": "out.onnx", "--size": (32, 32), "--color": "rgb", "--layout": "NCHW", "--labels": "NORMAL,PNEUMONIA", "--head": "logits"}
    options.update(changes)
    args = ["export", source]
    for option, value in options.items():
        if value is True:
            args.append(option)
        elif isinstance(value, tuple):
            args += [option, *value]
        elif value is not None:
            args += [option, tmp_path / value if option == "--out" else value]
    result = invoke(args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = result.output.strip()
    error = text[text.index("error:"):]
    assert len(error.splitlines()) == 1, text  # one line (errors are printed with soft_wrap)
    assert message in error
    assert not (tmp_path / "out.onnx").exists() or source == tmp_path / "out.onnx"
    assert source.read_bytes() == before  # the user's file is never touched


def test_the_console_script_refuses_a_non_onnx_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(os.urandom(256))
    script = Path(sys.executable).with_name("pneumoedge")
    done = subprocess.run([str(script), "export", str(bad), "--out", str(tmp_path / "w.onnx"), "--size", "32", "32"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "not an ONNX model" in done.stderr and "Traceback" not in done.stderr + done.stdout


def test_images_option_reports_what_the_runtime_gives_each_file(tmp_path: Path, rgb_folder: Path) -> None:
    source = cnn(tmp_path / "m.onnx", size=(48, 48), channels=1, classes=1, head="sigmoid")
    wrapped = tmp_path / "w.onnx"
    result = runner.invoke(app, ["export", str(source), "--out", str(wrapped), "--size", "48", "48", "--color", "gray",
                                 "--layout", "NCHW", "--head", "sigmoid", "--images", str(rgb_folder)], terminal_width=200)
    assert result.exit_code == 0, result.output
    ensemble = pneumoedge.load(wrapped)
    for path in sorted(rgb_folder.iterdir()):
        p = ensemble.predict(path).probabilities["PNEUMONIA"]
        line = next(l for l in result.output.splitlines() if path.name in l)
        assert f"{p:.6f}" in line


def test_int8_bundle_for_a_wrapped_model_goes_through_the_checked_search(tmp_path: Path, rgb_folder: Path) -> None:
    source = cnn(tmp_path / "m.onnx", size=(64, 64), channels=3, head="softmax")
    out = tmp_path / "bundle"
    result = invoke(["export", source, "--out", out, "--size", 64, 64, "--color", "rgb", "--layout", "NCHW", "--head", "softmax",
                     "--int8", "--calibration", rgb_folder, "--int8-max-diff", 0.2, "--int8-min-agreement", 0.5])
    assert result.exit_code == 0, result.output
    manifest = pneumoedge.bundle.read_manifest(out)
    assert {m.precision for m in manifest.members} == {"fp32", "int8"}
    int8 = manifest.members_for("int8")[0]
    assert int8.card.explain and int8.card.explain["heatmap_output"] == "pneumoedge_heatmap"
    assert int8.origin["sha256"] == pneumoedge.bundle.sha256_file(source)
    check = int8.card.explain["int8_check"]  # its heatmaps were compared with the fp32 graph's, as a Keras member's are
    assert check["images"] > 0 and check["heatmap_from"] in ("int8", "fp32") and -1.0 <= check["min_correlation"] <= 1.0
    chosen = manifest.provenance["int8"]["chosen"]
    assert chosen["max_prob_diff"] <= 0.2
    assert chosen["qdq_nodes"] == qdq_node_count(int8.path) > 0  # the provenance describes the file in the bundle
    assert manifest.provenance["wrapped"]["identical"] is True
    # The export's own int8-vs-fp32 timing and CPU, which the untuned precision rule trusts on a similar CPU.
    from pneumoedge.runtime.machine import cpu_info
    from pneumoedge.runtime.tuning import export_timing
    assert manifest.provenance["machine"]["simd"] == cpu_info().to_dict()["simd"]
    timing = export_timing(manifest, cpu_info())
    assert timing is not None and timing[0] > 0 and timing[1] > 0
    assert timing[:2] == (manifest.provenance["int8"]["fp32"]["latency_ms"], chosen["latency_ms"])
    int8_model = onnx.load(str(int8.path))
    assert "pneumoedge_quantization" in {p.key for p in int8_model.metadata_props}
    assert [n.op_type for n in int8_model.graph.node if n.name == "pneumoedge_cam_raw"] == ["Einsum"]  # the map's weighting stays float
    assert [o.name for o in int8_model.graph.output][1:] == ["pneumoedge_heatmap", "pneumoedge_features"]
    fp32 = pneumoedge.load(out, precision="fp32").predict(rgb_folder / "a.png").probabilities["PNEUMONIA"]
    q = pneumoedge.load(out, precision="int8").predict(rgb_folder / "a.png").probabilities["PNEUMONIA"]
    assert abs(fp32 - q) <= 0.2


def test_a_real_torch_model_exported_with_the_documented_recipe(tmp_path: Path, rgb_folder: Path) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed here (not a dependency); the recipe runs where it is")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2),
    ).eval()
    path = tmp_path / "torch.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), str(path), opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    wrapped = tmp_path / "w.onnx"
    assert invoke(["export", path, "--out", wrapped, "--size", 224, 224, *IMAGENET]).exit_code == 0
    ensemble = pneumoedge.load(wrapped)
    for file in sorted(rgb_folder.iterdir()):
        with torch.no_grad():
            expected = torch.softmax(model(torch.from_numpy(numpy_pipeline(file)[None].copy())), dim=1)[0, 1].item()
        assert ensemble.predict(file).probabilities["PNEUMONIA"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("door", ["export_onnx", "export_foreign"])
def test_declared_spec_doors_refuse_a_reduced_decode_before_reading_the_model(tmp_path: Path, door: str) -> None:
    """Both doors with a user-declared spec share one rule (foreign.declared_options): full decode only."""
    import dataclasses

    from pneumoedge.export import foreign, onnx_wrap
    from pneumoedge.export.errors import ExportError
    from pneumoedge.preprocessing import PreprocessSpec

    export = getattr(onnx_wrap if door == "export_onnx" else foreign, door)
    spec = dataclasses.replace(PreprocessSpec(), decode_reduction=2)
    with pytest.raises(ExportError, match="full decode"):
        export(tmp_path / "absent.onnx", tmp_path / "bundle", spec=spec, labels=["NORMAL", "PNEUMONIA"], head="softmax")
    assert not (tmp_path / "bundle").exists()
