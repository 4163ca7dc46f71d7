"""`pneumoedge serve`'s JSON API in-process (FastAPI's TestClient): results, limits, auth, privacy."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import pneumoedge  # noqa: E402
from pneumoedge.cli import app as cli_app  # noqa: E402
from pneumoedge.serve import ServeSettings, create_app  # noqa: E402
from tests.input_files import dicom_bytes  # noqa: E402
from tests.serve_helpers import EXAMPLES  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
PATIENT = "Doe^Jane"
PATIENT_ID = "PID-SECRET-4711"
runner = CliRunner()


@pytest.fixture(scope="module")
def ensemble():
    return pneumoedge.load(threads="auto")  # as `infer` loads it (its defaults: precision and threads "auto")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The example images plus a DICOM (carrying patient fields) made from the first one."""
    folder = tmp_path_factory.mktemp("inputs")
    for image in sorted(EXAMPLES.glob("example_*")):
        shutil.copy(image, folder / image.name)
    pixels = cv2.imread(str(EXAMPLES / "example_01.jpeg"), cv2.IMREAD_GRAYSCALE)
    (folder / "patient_Doe_Jane.dcm").write_bytes(dicom_bytes(pixels, PatientName=PATIENT, PatientID=PATIENT_ID))
    return folder


@pytest.fixture(scope="module")
def infer_rows(inputs: Path, tmp_path_factory) -> dict[str, dict]:
    """`pneumoedge infer --format jsonl` on the same files, by file name."""
    out = tmp_path_factory.mktemp("infer") / "rows.jsonl"
    result = runner.invoke(cli_app, ["infer", str(inputs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {Path(row["path"]).name: row for row in rows}


@pytest.fixture(scope="module")
def client(ensemble):
    with _client(create_app(ensemble)) as test_client:
        yield test_client


def _client(app) -> TestClient:
    """A test client that names a host the server answers (the default loopback names)."""
    return TestClient(app, base_url="http://localhost")


def _same_as_infer(row: dict, expected: dict) -> None:
    """Every field of the JSONL row, bit for bit (floats compared exactly), except the path.

    `ood_score` within float32 rounding: the runtime's OOD distances are one float32 GEMM per
    batch (9b6b8f4), and infer batches images where serve runs them one by one.
    """
    assert row["status"] == "ok"
    skipped = ("path", "ood_score")
    assert {k: v for k, v in row.items() if k not in skipped} == {k: v for k, v in expected.items() if k not in skipped}
    assert (row["ood_score"] is None) == (expected["ood_score"] is None)
    if row["ood_score"] is not None:
        assert row["ood_score"] == pytest.approx(expected["ood_score"], rel=1e-5)


def test_multipart_rows_equal_infer_bit_for_bit(client, inputs, infer_rows) -> None:
    names = sorted(p.name for p in inputs.iterdir())
    assert len(names) == 9
    for name in names:
        response = client.post("/api/v1/predict", files={"file": (name, (inputs / name).read_bytes())})
        assert response.status_code == 200, response.text
        (row,) = response.json()["results"]
        assert row["path"] == name
        _same_as_infer(row, infer_rows[name])


def test_several_files_in_one_request_come_back_in_order(client, inputs, infer_rows) -> None:
    names = ["example_03.jpeg", "example_05.png", "patient_Doe_Jane.dcm", "example_01.jpeg"]
    files = [("file", (n, (inputs / n).read_bytes())) for n in names]
    response = client.post("/api/v1/predict", files=files)
    assert response.status_code == 200
    rows = response.json()["results"]
    assert [r["path"] for r in rows] == names
    for row in rows:
        _same_as_infer(row, infer_rows[row["path"]])


@pytest.mark.parametrize(
    "name, content_type",
    [("example_02.jpeg", "image/jpeg"), ("example_05.png", "image/png"), ("patient_Doe_Jane.dcm", "application/dicom")],
)
def test_raw_body_with_its_content_type(client, inputs, infer_rows, name, content_type) -> None:
    response = client.post(
        "/api/v1/predict", params={"filename": name}, content=(inputs / name).read_bytes(), headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text
    _same_as_infer(response.json()["results"][0], infer_rows[name])


def test_unreadable_and_unsupported_inputs(client, inputs) -> None:
    jpeg = (inputs / "example_01.jpeg").read_bytes()
    cases = [
        # (request kwargs, status, words in the reason)
        (dict(files={"file": ("scan.png", b"%PDF-1.4 a letter")}), 415, "PDF"),
        (dict(files={"file": ("cut.jpeg", jpeg[:4000])}), 422, "truncated"),
        (dict(files={"file": ("empty.png", b"")}), 422, "empty"),
        (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported Content-Type"),
        (dict(content=jpeg), 415, "unsupported Content-Type"),  # no Content-Type at all
        (dict(content=b"%PDF-1.4", headers={"Content-Type": "image/png"}), 415, "PDF"),
        (dict(content=b"--x\r\nnonsense", headers={"Content-Type": "multipart/form-data; boundary=x"}), 400, "malformed multipart"),
        (dict(content=b"\x00" * 50, headers={"Content-Type": "multipart/form-data; boundary=abc"}), 400, "malformed multipart"),
        (dict(content=b"abc", headers={"Content-Type": "multipart/form-data"}), 400, "no boundary"),
        (dict(data={"note": "no file"}, files={"x": ("", b"")}), 422, "no file"),
    ]
    for kwargs, status, words in cases:
        response = client.post("/api/v1/predict", **kwargs)
        assert response.status_code == status, (kwargs.get("headers"), response.text)
        body = response.json()
        reason = body["results"][0]["error"] if "results" in body else body["detail"]
        assert words.lower() in reason.lower(), reason
    # One bad file among good ones: 200, and the bad one has its own row with the reason.
    response = client.post("/api/v1/predict", files=[("file", ("a.jpeg", jpeg)), ("file", ("b.png", b"%PDF-1.4"))])
    assert response.status_code == 200
    assert [r["status"] for r in response.json()["results"]] == ["ok", "error"]


def _asgi_post(app, chunks: int, chunk: bytes, headers: list, first: bytes = b"", then=None) -> tuple[int, int]:
    """POST a body of `chunks` x `chunk` straight through ASGI; (status, body messages the app pulled).

    `then`: an async function whose result replaces every message after the first (a stall, a disconnect).
    """
    pulled = 0
    status = []

    async def receive():
        nonlocal pulled
        pulled += 1
        if then is not None and pulled > 1:
            return await then()
        return {"type": "http.request", "body": first if pulled == 1 and first else chunk, "more_body": pulled < chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/api/v1/predict", "raw_path": b"/api/v1/predict", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), *headers], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    return status[0], pulled


def test_413_while_streaming_before_the_body_is_read(ensemble, inputs) -> None:
    limit = 100_000
    app = create_app(ensemble, ServeSettings(max_upload_bytes=limit))
    # 10 MB announced by nobody (chunked): refused after ~limit bytes, the rest never pulled.
    status, pulled = _asgi_post(app, 1000, b"\xff" * 10_000, [(b"content-type", b"image/jpeg")])
    assert status == 413 and pulled <= limit // 10_000 + 1
    boundary = [(b"content-type", b"multipart/form-data; boundary=b")]
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpeg"\r\n\r\n'
    status, pulled = _asgi_post(app, 1000, b"x" * 10_000, boundary, first=part)
    assert status == 413 and pulled <= limit // 10_000 + 1
    # A declared 2 GB body is refused before any of it is read.
    status, pulled = _asgi_post(app, 1000, b"x", [(b"content-type", b"image/jpeg"), (b"content-length", b"2000000000")])
    assert status == 413 and pulled == 0
    with _client(app) as small:
        big = (inputs / "example_05.png").read_bytes()
        assert len(big) > limit
        too_big = small.post("/api/v1/predict", files={"file": ("x.png", big)})
        assert too_big.status_code == 413 and "limit is" in too_big.json()["detail"]
        small_file = (inputs / "example_01.jpeg").read_bytes()[:50_000]
        assert small.post("/api/v1/predict", files={"file": ("t.jpeg", small_file)}).status_code == 422  # under the limit: read


def test_stalled_upload_gets_408_and_a_vanished_client_frees_its_slot(ensemble, caplog) -> None:
    app = create_app(ensemble, ServeSettings(body_timeout_s=0.2, queue_limit=1))

    async def stall():
        await asyncio.sleep(5)

    async def disconnect():
        return {"type": "http.disconnect"}

    headers = [(b"content-type", b"image/jpeg"), (b"content-length", b"100000")]
    started = time.monotonic()
    assert _asgi_post(app, 10, b"x" * 10_000, headers, then=stall)[0] == 408
    assert time.monotonic() - started < 3
    with caplog.at_level(logging.INFO, logger="pneumoedge.serve"):
        assert _asgi_post(app, 10, b"x" * 10_000, headers, then=disconnect)[0] == 499
    assert "status=499" in caplog.text
    assert app.app.state.queue.pending == 0  # both slots given back: the next request is admitted
    with _client(app) as client:
        jpeg = (EXAMPLES / "example_01.jpeg").read_bytes()
        assert client.post("/api/v1/predict", content=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200


class _Gated:
    """The real ensemble, whose predictions wait for a gate: holds requests in the queue on demand."""

    def __init__(self, ensemble) -> None:
        self._ensemble = ensemble
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._ensemble, name)

    def predict(self, source, **kwargs):
        assert self.gate.wait(30)
        return self._ensemble.predict(source, **kwargs)


def test_queue_full_gives_503_with_retry_after_then_recovers(ensemble, inputs) -> None:
    gated = _Gated(ensemble)
    jpeg = (inputs / "example_01.jpeg").read_bytes()
    wrapped = create_app(gated, ServeSettings(queue_limit=2))
    queue = wrapped.app.state.queue
    with _client(wrapped) as client:
        held = []
        threads = [threading.Thread(target=lambda: held.append(client.post("/api/v1/predict", files={"file": ("a.jpeg", jpeg)}))) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while queue.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.pending == 2
        refused = [client.post("/api/v1/predict", files={"file": ("a.jpeg", jpeg)}) for _ in range(5)]
        assert {r.status_code for r in refused} == {503}
        assert all(r.headers["Retry-After"] == "1" and "busy" in r.json()["detail"] for r in refused)
        assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200
        gated.gate.set()
        for thread in threads:
            thread.join(30)
        assert [r.status_code for r in held] == [200, 200]
        assert queue.pending == 0
        assert client.post("/api/v1/predict", files={"file": ("a.jpeg", jpeg)}).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_model_health_schema_and_docs(client, ensemble) -> None:
    model = client.get("/api/v1/model").json()
    described = ensemble.describe()
    assert model["labels"] == described["labels"] and model["threshold"] == described["threshold"]
    assert [m["name"] for m in model["members"]] == [m["name"] for m in described["members"]]
    manifest = ensemble.manifest
    assert model["name"] == manifest.name
    # The provenance as recorded, except that folders in it are shown by name only (no paths).
    assert model["provenance"].keys() == manifest.provenance.keys()
    assert model["provenance"]["data"] == [Path(folder).name for folder in manifest.provenance["data"]]
    for key, value in manifest.provenance.items():
        if "/" not in json.dumps(value):
            assert model["provenance"][key] == value, key
    # The members that run (precision "auto" picks int8 on a VNNI machine), each with its recorded sha256.
    precision = model["members"][0]["precision"]
    assert [m["sha256"] for m in model["members"]] == [e.sha256 for e in manifest.members_for(precision)]
    assert model["synthetic"] is True and "synthetic phantoms" in model["provenance_summary"]
    assert model["notice"] == "Decision support, not a diagnosis."
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json()["status"] == "ready"
    schema = client.get("/api/v1/openapi.json").json()
    assert {"/api/v1/predict", "/api/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/api/v1/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_model_description_shows_no_server_paths(client, ensemble) -> None:
    """Finding 4: member files, the bundle folder and recorded data folders are names, never paths."""
    text = client.get("/api/v1/model").text
    strings: list[str] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            strings.append(value)

    walk(json.loads(text))
    assert strings and not [s for s in strings if s.startswith(("/", "~")) or ":\\" in s]
    root = ensemble.manifest.root.resolve()
    for secret in (str(root), str(root.parent), str(Path.home()), "/tmp/"):
        assert secret not in text, f"{secret!r} is shown by /api/v1/model"
    model = json.loads(text)
    assert model["bundle"] == root.name
    assert [m["source"] for m in model["members"]] == [Path(m["source"]).name for m in ensemble.describe()["members"]]


def test_page_assets_are_local_and_headers_are_strict(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "Decision support, not a diagnosis." in page.text
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/static/app.js", "/static/app.css"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text and "@import" not in text
    for path in ("/", "/api/v1/model", "/static/app.js"):
        response = client.get(path, headers={"Origin": "http://elsewhere.example"})
        headers = response.headers
        assert "default-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "no-store"
        assert not any(k.lower().startswith("access-control-") for k in headers), "CORS must be off"
    preflight = client.options("/api/v1/predict", headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_token_required_on_page_and_api_when_set(ensemble) -> None:
    with _client(create_app(ensemble, ServeSettings(token=TOKEN))) as client:
        for path in ("/", "/api/v1/model", "/static/app.js", "/api/v1/openapi.json"):
            response = client.get(path)
            assert response.status_code == 401 and "Basic" in response.headers["www-authenticate"]
            assert client.get(path, headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
            assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
            assert client.get(path, headers={"Authorization": f"Basic {basic}"}).status_code == 200
        assert client.post("/api/v1/predict", content=b"x", headers={"Content-Type": "image/jpeg"}).status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_logs_hold_ids_sizes_and_timings_never_names_or_patient_fields(client, inputs, caplog) -> None:
    secret_name = "Doe_Jane_1967-03-04.jpeg"
    with caplog.at_level(logging.INFO, logger="pneumoedge.serve"):
        response = client.post(
            "/api/v1/predict",
            files=[
                ("file", (secret_name, (inputs / "example_01.jpeg").read_bytes())),
                ("file", ("patient_Doe_Jane.dcm", (inputs / "patient_Doe_Jane.dcm").read_bytes())),
            ],
        )
        client.post(f"/api/v1/predict?filename={secret_name}", content=b"%PDF", headers={"Content-Type": "image/png"})
        client.get(f"/static/{secret_name}")
    assert response.status_code == 200
    text = caplog.text
    request_id = response.headers["x-request-id"]
    assert request_id == response.json()["request_id"] and f"request={request_id}" in text
    assert "status=200 files=2" in text and "ms=" in text and "in_bytes=" in text
    for secret in ("Doe", "Jane", PATIENT_ID, "1967", ".jpeg", ".dcm"):
        assert secret not in text, f"{secret!r} leaked into the logs"


def test_uploads_stay_in_memory_unless_kept(ensemble, inputs, tmp_path, monkeypatch) -> None:
    big = (inputs / "example_05.png").read_bytes()  # > 1 MB: Starlette's own form parser would spool it to disk
    created = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp"):
        original = getattr(tempfile, name)
        monkeypatch.setattr(tempfile, name, lambda *a, _o=original, _n=name, **k: (created.append(_n), _o(*a, **k))[1])
    with _client(create_app(ensemble)) as client:
        assert client.post("/api/v1/predict", files={"file": ("x.png", big)}).status_code == 200
    assert created == []
    kept = tmp_path / "kept"
    kept.mkdir()
    with _client(create_app(ensemble, ServeSettings(keep_uploads=kept))) as client:
        response = client.post("/api/v1/predict", files=[("file", ("Doe.png", big)), ("file", ("x.pdf", b"%PDF-1"))])
    request_id = response.json()["request_id"]
    assert sorted(p.name for p in kept.iterdir()) == [f"{request_id}-1.png", f"{request_id}-2.bin"]
    assert (kept / f"{request_id}-1.png").read_bytes() == big


def test_explain_on_a_model_without_heatmaps_says_why(gray_model, inputs) -> None:
    plain = pneumoedge.load(gray_model)  # a tiny ONNX model without heatmap outputs
    assert not plain.can_explain
    with _client(create_app(plain)) as client:
        response = client.post("/api/v1/predict?explain=1", files={"file": ("a.jpeg", (inputs / "example_01.jpeg").read_bytes())})
        note = client.get("/api/v1/model").json()["explain_note"]
    assert response.status_code == 200
    body = response.json()
    assert body["explain"] == {"requested": True, "available": False, "note": plain.explain_note} and note == plain.explain_note
    assert body["explain"]["note"] and body["results"][0]["overlay"] == ""


def test_explain_returns_the_overlay_of_predict_explain_inline(tmp_path, inputs) -> None:
    """A foreign CNN exported with heatmaps: `?explain=1` gives `Prediction.overlay()` as a PNG data URL."""
    pytest.importorskip("onnx", reason="export needs the [export] extra")
    from tests.foreign_models import cnn

    source = cnn(tmp_path / "m.onnx", size=(64, 64), channels=3, classes=2, head="logits")
    model = tmp_path / "explained.onnx"
    args = ["export", str(source), "--out", str(model), "--size", "64", "64", "--color", "rgb", "--layout", "NCHW",
            "--labels", "NORMAL,PNEUMONIA", "--head", "logits"]
    result = runner.invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    explaining = pneumoedge.load(model, threads=1)
    assert explaining.can_explain
    data = (inputs / "example_05.png").read_bytes()
    with _client(create_app(explaining)) as client:
        assert client.get("/api/v1/model").json()["can_explain"] is True
        plain = client.post("/api/v1/predict", files={"file": ("x.png", data)}).json()["results"][0]
        explained = client.post("/api/v1/predict?explain=1", files={"file": ("x.png", data)}).json()
    assert plain["overlay"] == "" and explained["explain"]["available"] is True
    row = explained["results"][0]
    assert row["probabilities"] == plain["probabilities"]  # explaining does not move the result
    prefix = "data:image/png;base64,"
    assert row["overlay"].startswith(prefix)
    png = np.frombuffer(base64.b64decode(row["overlay"][len(prefix):]), np.uint8)
    shown = cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    expected = explaining.predict(data, explain=True).overlay(max_side=1024)
    assert shown.shape == expected.shape
    assert np.array_equal(shown, expected)


def _first_error_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("error:"))


def test_cli_refuses_unsafe_or_broken_starts_with_one_line(tmp_path) -> None:
    missing = str(tmp_path / "no-such-model")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    cases = [
        (["serve", "--host", "0.0.0.0"], "--token"),
        (["serve", "--host", "0.0.0.0", "--token", "short"], "at least 16"),
        (["serve", "--keep-uploads", missing], "no such folder"),
        (["serve", "--model", missing], "no such model file"),
        (["serve", "--port", str(busy.getsockname()[1])], "cannot listen"),
    ]
    try:
        for args, words in cases:
            result = runner.invoke(cli_app, args)
            assert result.exit_code == 2, (args, result.output)
            assert words in _first_error_line(result.output), result.output
            assert "Traceback" not in result.output
    finally:
        busy.close()
    # The model error is the same line as infer's.
    infer = runner.invoke(cli_app, ["infer", str(tmp_path), "--model", missing])
    serve = runner.invoke(cli_app, ["serve", "--model", missing])
    assert infer.exit_code == serve.exit_code == 2
    assert _first_error_line(infer.output) == _first_error_line(serve.output)


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("LocalHost", True), (" 127.0.0.1 ", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("clinic-pc", False)],
)
def test_which_addresses_count_as_loopback(host, loopback) -> None:
    from pneumoedge.network import is_loopback

    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "args, env, warned",
    [
        (["--host", "0.0.0.0", "--insecure-no-auth"], {}, True),
        (["--host", "0.0.0.0"], {"PNEUMOEDGE_SERVE_TOKEN": TOKEN}, False),
        (["--host", "127.0.0.1"], {}, False),
    ],
)
def test_non_loopback_without_token_starts_only_when_told_and_warns(monkeypatch, args, env, warned) -> None:
    """The verb up to the server's start; the socket is bound on loopback and the server not run."""
    import uvicorn

    from pneumoedge.serve import server

    real_bind = server.open_listener
    started = []
    monkeypatch.setattr(server, "open_listener", lambda host, port: real_bind("127.0.0.1", 0))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=(): (started.append(self.config.app), [s.close() for s in sockets]))
    for name in ("pneumoedge.serve", "uvicorn.error"):  # the verb configures these; restored afterwards
        logger = logging.getLogger(name)
        for attribute in ("handlers", "propagate", "level"):
            monkeypatch.setattr(logger, attribute, getattr(logger, attribute) if attribute != "handlers" else [])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = runner.invoke(cli_app, ["serve", *args])
    assert result.exit_code == 0, result.output
    assert len(started) == 1
    assert ("WITHOUT authentication" in result.output) is warned
    assert started[0].token == (TOKEN.encode() if env else None)


# --- issue 19: slow senders, closing refusals, hosts, schema, page details ---------------------


def _trickle_app(ensemble, **settings):
    return create_app(ensemble, ServeSettings(**settings))


async def _post_concurrently(app, first_receive, jpeg: bytes) -> tuple[list[int], list[int], int]:
    """Request A (body from `first_receive`) still uploading while request B sends a whole image."""
    statuses_a: list[int] = []
    statuses_b: list[int] = []

    def scope(headers):
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/api/v1/predict", "raw_path": b"/api/v1/predict", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"localhost"), *headers], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        }

    def sender(statuses):
        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
        return send

    sent = []

    async def whole_body():
        if sent:
            await asyncio.sleep(60)
        sent.append(1)
        return {"type": "http.request", "body": jpeg, "more_body": False}

    queue = app.app.state.queue
    queue.start()
    try:
        slow = asyncio.ensure_future(app(scope([(b"content-type", b"image/jpeg")]), first_receive, sender(statuses_a)))
        await asyncio.sleep(0.3)  # A has started its body
        pending_during_upload = queue.pending
        await app(scope([(b"content-type", b"image/jpeg")]), whole_body, sender(statuses_b))
        await asyncio.wait_for(slow, 10)
    finally:
        queue.stop()
    return statuses_a, statuses_b, pending_during_upload


def test_slow_sender_holds_no_model_slot_and_is_cut_off_by_the_minimum_rate(ensemble) -> None:
    """Finding 1: a trickling upload neither takes the only slot nor lasts past the rate limit."""
    app = _trickle_app(ensemble, queue_limit=1, min_upload_rate=1000, rate_grace_s=1.0)
    jpeg = (EXAMPLES / "example_01.jpeg").read_bytes()

    async def one_byte_at_a_time():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"\xff", "more_body": True}

    started = time.monotonic()
    slow, ready, pending = asyncio.run(_post_concurrently(app, one_byte_at_a_time, jpeg))
    assert pending == 0  # still uploading: no slot taken
    assert ready == [200]  # the ready request ran (it got 503 when uploads held slots)
    assert slow == [408]
    assert time.monotonic() - started < 5


def test_upload_deadline_and_rate_give_408_with_the_option_named(ensemble) -> None:
    async def steady():  # 10 kB every 0.05 s: fast enough for the rate, never ends
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x" * 10_000, "more_body": True}

    async def trickle():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    headers = [(b"content-type", b"image/jpeg")]
    for settings, receive, words in [
        (dict(body_deadline_s=0.5, min_upload_rate=0, max_upload_bytes=10**9), steady, "--upload-deadline"),
        (dict(min_upload_rate=100_000, rate_grace_s=0.3), trickle, "--min-upload-rate"),
    ]:
        app = _trickle_app(ensemble, **settings)
        messages = []

        async def run(app=app, receive=receive):
            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                "path": "/api/v1/predict", "raw_path": b"/api/v1/predict", "query_string": b"", "root_path": "",
                "headers": [(b"host", b"localhost"), *headers], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            }

            async def send(message):
                messages.append(message)

            await app(scope, receive, send)

        started = time.monotonic()
        asyncio.run(run())
        assert time.monotonic() - started < 3
        start = messages[0]
        assert start["status"] == 408
        assert (b"connection", b"close") in start["headers"]
        assert words in json.loads(messages[1]["body"])["detail"]


def test_refusals_before_the_body_is_read_close_the_connection(client, ensemble) -> None:
    """Finding 2: 413 (and 415, 422 on parameters) say Connection: close; the body is left unread."""
    small = create_app(ensemble, ServeSettings(max_upload_bytes=1000))
    status, pulled = _asgi_post(small, 1000, b"x", [(b"content-type", b"image/jpeg"), (b"content-length", b"2147483648")])
    assert status == 413 and pulled == 0
    with _client(small) as small_client:
        too_big = small_client.post("/api/v1/predict", content=b"x" * 2000, headers={"Content-Type": "image/jpeg"})
    assert too_big.status_code == 413 and too_big.headers["connection"] == "close"
    big = b"x" * 300_000  # more than uvicorn should discard to keep the connection
    wrong_type = client.post("/api/v1/predict", content=big, headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415 and wrong_type.headers["connection"] == "close"
    bad_parameter = client.post("/api/v1/predict?explain=perhaps", content=big, headers={"Content-Type": "image/jpeg"})
    assert bad_parameter.status_code == 422 and bad_parameter.headers["connection"] == "close"
    assert isinstance(bad_parameter.json()["detail"], str) and "explain" in bad_parameter.json()["detail"]
    # A small unread body is discarded instead: closing a socket with unread input resets it,
    # and the reset can destroy the answer before the client reads it.
    small_refusal = client.post("/api/v1/predict?explain=perhaps", content=b"x" * 300, headers={"Content-Type": "image/jpeg"})
    assert small_refusal.status_code == 422 and "connection" not in small_refusal.headers


def test_host_header_and_origin_are_checked(ensemble, inputs) -> None:
    """Finding 3: DNS rebinding (a foreign name in Host) and cross-site writes are refused."""
    jpeg = (inputs / "example_01.jpeg").read_bytes()
    app = create_app(ensemble)  # the default: the loopback names only
    with TestClient(app, base_url="http://localhost:8000") as client:
        for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "10.0.0.5", ""):
            response = client.get("/api/v1/model", headers={"Host": host})
            assert response.status_code == 400 and "Host" in response.json()["detail"], host
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
            assert client.get("/api/v1/model", headers={"Host": host}).status_code == 200, host
        refused = client.post("/api/v1/predict", files={"file": ("a.jpeg", jpeg)}, headers={"Origin": "http://evil.example"})
        assert refused.status_code == 403 and "cross-origin" in refused.json()["detail"]
        assert client.post("/api/v1/predict", files={"file": ("a.jpeg", jpeg)}, headers={"Origin": "null"}).status_code == 403
        same = client.post("/api/v1/predict", files={"file": ("a.jpeg", jpeg)}, headers={"Origin": "http://localhost:8000"})
        assert same.status_code == 200
        assert client.post("/api/v1/predict", files={"file": ("a.jpeg", jpeg)}).status_code == 200  # scripts send no Origin
        assert client.get("/api/v1/model", headers={"Origin": "http://evil.example"}).status_code == 200  # reads: no CORS anyway


@pytest.mark.parametrize(
    "bind, extra, allowed, refused",
    [
        ("127.0.0.1", [], ["127.0.0.1:8000", "localhost", "[::1]:1"], ["192.168.1.5", "clinic-pc", "evil.example"]),
        ("127.0.0.1", ["clinic.example"], ["clinic.example:443", "Clinic.Example."], ["evil.example"]),
        ("0.0.0.0", [], ["192.168.1.5:8000", "[fe80::1]:8000", "localhost"], ["evil.example"]),
        ("192.168.1.5", [], ["192.168.1.5:8000"], ["10.0.0.1", "evil.example"]),
    ],
)
def test_host_policy_for_each_bind(bind, extra, allowed, refused) -> None:
    from pneumoedge.serve.settings import HostPolicy

    policy = HostPolicy.for_bind(bind, extra)
    assert all(policy.allows(host) for host in allowed), (policy, allowed)
    assert not any(policy.allows(host) for host in refused), (policy, refused)
    if bind == "0.0.0.0":
        assert policy.allows(socket.gethostname())


def test_head_of_the_page_answers(client) -> None:
    """Finding 7: HEAD / is 200 with GET's headers and no body (it was 405)."""
    head, get = client.head("/"), client.get("/")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["content-security-policy"] == get.headers["content-security-policy"]


def test_websocket_scopes_are_refused_before_the_app(ensemble) -> None:
    """Finding 7: a WebSocket scope never reaches the app, token or not (it skipped the check)."""
    from pneumoedge.serve.middleware import ServeMiddleware

    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["type"])

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "websocket.connect"}

    for token in (None, TOKEN):
        scope = {"type": "websocket", "path": "/api/v1/predict", "headers": [(b"host", b"localhost")], "query_string": b""}
        asyncio.run(ServeMiddleware(inner, token=token)(scope, receive, send))
    assert reached == [] and [m["type"] for m in sent] == ["websocket.close", "websocket.close"]
    asyncio.run(ServeMiddleware(inner)({"type": "lifespan"}, receive, send))
    assert reached == ["lifespan"]


def test_kept_uploads_are_readable_by_the_owner_only(ensemble, inputs, tmp_path) -> None:
    """Finding 7: --keep-uploads files are 0600 whatever the umask (they were world-readable)."""
    import os
    import stat

    kept = tmp_path / "kept"
    kept.mkdir()
    old = os.umask(0o002)
    try:
        with _client(create_app(ensemble, ServeSettings(keep_uploads=kept))) as client:
            assert client.post("/api/v1/predict", files={"file": ("a.jpeg", (inputs / "example_01.jpeg").read_bytes())}).status_code == 200
    finally:
        os.umask(old)
    (written,) = kept.iterdir()
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def test_a_ct_dicom_is_refused_by_the_modality_rule(client) -> None:
    """Finding 6: a CT slice is not classified as a chest X-ray (dicom.not_a_radiograph, as infer and listen)."""
    pixels = cv2.imread(str(EXAMPLES / "example_01.jpeg"), cv2.IMREAD_GRAYSCALE)
    ct = dicom_bytes(pixels, Modality="CT")
    response = client.post("/api/v1/predict", files={"file": ("slice.dcm", ct)})
    assert response.status_code == 422
    body = response.json()
    assert "CT" in body["detail"] and "not a projection radiograph" in body["detail"]
    assert body["results"][0]["status"] == "error" and body["results"][0]["label"] is None
    cr = client.post("/api/v1/predict", files={"file": ("chest.dcm", dicom_bytes(pixels, Modality="CR"))})
    assert cr.status_code == 200 and cr.json()["results"][0]["status"] == "ok"


def test_when_every_file_fails_the_body_is_the_error_body(client) -> None:
    """Finding 5: 415/422 carry the documented {"detail": ...} (plus each file's row)."""
    for files, status in [
        ([("file", ("a.png", b"%PDF-1.4"))], 415),
        ([("file", ("a.jpeg", b"\xff\xd8\xff\xe0 truncated"))], 422),
        ([("file", ("a.png", b"%PDF-1.4")), ("file", ("b.jpeg", b"\xff\xd8\xff"))], 422),
    ]:
        response = client.post("/api/v1/predict", files=files)
        assert response.status_code == status, response.text
        body = response.json()
        assert isinstance(body["detail"], str) and body["detail"].startswith("no file could be classified")
        assert [row["path"] for row in body["results"]] == [name for _, (name, _) in files]


def test_an_empty_file_is_refused_for_the_whole_request(client, inputs) -> None:
    """The schema says each file has at least one byte: an empty one is a broken client, 422 with its name."""
    jpeg = (inputs / "example_01.jpeg").read_bytes()
    for kwargs in [
        dict(files=[("file", ("a.jpeg", jpeg)), ("file", ("cut.png", b""))]),
        dict(content=b"", headers={"Content-Type": "image/png"}, params={"filename": "cut.png"}),
    ]:
        response = client.post("/api/v1/predict", **kwargs)
        assert response.status_code == 422
        assert response.json()["detail"].startswith("empty file (0 bytes): cut.png")


def test_openapi_schema_describes_bodies_statuses_and_auth(ensemble) -> None:
    """Finding 5: every response has a schema; predict's 200, errors, required `file`, 401, the token schemes."""
    with _client(create_app(ensemble, ServeSettings(token=TOKEN))) as client:
        schema = client.get("/api/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    components = schema["components"]["schemas"]
    predict = schema["paths"]["/api/v1/predict"]["post"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/PredictResponse"}
    assert {"request_id", "results", "model", "explain", "notice"} <= set(components["PredictResponse"]["required"])
    row = components["Row"]
    assert set(row["required"]) == {"path", "status", "label", "probability", "probabilities", "member_probabilities",
                                     "disagreement", "threshold", "provider", "ood", "ood_score", "overlay", "error"}
    assert set(predict["responses"]) == {"200", "400", "401", "403", "408", "413", "415", "422", "503"}
    multipart = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert multipart["required"] == ["file"]
    assert components["ErrorBody"]["required"] == ["detail"] and components["ErrorBody"]["properties"]["detail"]["type"] == "string"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                assert response.get("content"), (path, method, status)
            if path not in ("/healthz", "/readyz"):
                assert "401" in operation["responses"], (path, method)
    assert schema["paths"]["/healthz"]["get"]["security"] == [] and schema["paths"]["/readyz"]["get"]["security"] == []
    assert schema["security"] == [{"bearer": []}, {"basic": []}]
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer TOKEN (serve --token)"}
    # The FastAPI default (a list of pydantic errors under "detail") is not offered anywhere.
    assert "HTTPValidationError" not in components
