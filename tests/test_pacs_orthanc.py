"""The DICOM node against a real Orthanc: pushes in, SRs back into the same study, kills and outages.

One Orthanc serves the whole test session (started once, stopped by its PID). Each test uses its own
studies, so tests do not see each other's objects.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from pneumoedge.cli import app  # noqa: E402
from pneumoedge.pacs import report  # noqa: E402
from pneumoedge.pacs.ledger import read_rows  # noqa: E402
from pneumoedge.pacs.node import Node, NodeConfig  # noqa: E402
from pneumoedge.pacs.send import Destination  # noqa: E402
from pneumoedge.runtime.loading import load  # noqa: E402
from tests.orthanc_helpers import HOST, Orthanc, chest_instance, dciodvfy, free_port, uids_of  # noqa: E402
from tests.system_tools import require_program  # noqa: E402

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
runner = CliRunner()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    program = require_program("Orthanc", install_hint="apt-get install -y orthanc")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), program)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ensemble():
    return load()


@pytest.fixture
def node_factory(ensemble, orthanc: Orthanc, tmp_path: Path):
    """Start in-process nodes registered in Orthanc as modality PE_<n>; stopped after the test."""
    nodes: list[Node] = []

    def start(model=None, **overrides) -> tuple[Node, str]:
        port = free_port()
        config = NodeConfig(
            out=tmp_path / f"node{len(nodes)}", aet="PNEUMOEDGE", host=HOST, port=port,
            send_to=Destination(orthanc.aet, HOST, orthanc.dicom_port), retry_max=0.5, **overrides,
        )
        node = Node(model or ensemble, config)
        node.start()
        nodes.append(node)
        name = f"PE_{os.getpid()}_{len(nodes)}"
        orthanc.add_modality(name, "PNEUMOEDGE", port)
        return node, name

    yield start
    for node in nodes:
        node.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def rows_of(node: Node) -> list[dict]:
    return read_rows(node.ledger.path) if node.ledger.path.exists() else []


def objects(orthanc: Orthanc, study_uid: str, sop_class: str) -> list:
    return [pydicom.dcmread(io.BytesIO(data)) for data in orthanc.instances_of_class(study_uid, sop_class)]


def _text_items(sr) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for item in sr.ContentSequence:
        if item.ValueType == "TEXT":
            found.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
    return found


def test_dx_and_cr_pushed_from_orthanc_get_rows_and_srs_in_their_study(orthanc: Orthanc, node_factory, ensemble, tmp_path: Path) -> None:
    node, name = node_factory(heatmaps=True)
    sources = {
        "DX": chest_instance(modality="DX", seed=1, patient_name="Secret^Alice"),
        "CR": chest_instance(modality="CR", sixteen_bit=True, seed=2, size=320, patient_name="Secret^Bob"),
    }
    ids = [orthanc.upload(data) for data in sources.values()]
    orthanc.push(name, ids)
    wait_for(lambda: len(rows_of(node)) == 2, what="two result rows")
    rows = {r["SOPInstanceUID"]: r for r in rows_of(node)}
    identity = report.model_identity(ensemble)
    can_explain = bool(getattr(ensemble, "can_explain", False))
    for modality, data in sources.items():
        study, series, sop = uids_of(data)
        row = rows[sop]
        assert (row["status"], row["StudyInstanceUID"], row["SeriesInstanceUID"], row["calling_ae"]) == ("ok", study, series, orthanc.aet)
        assert row["probabilities"]["PNEUMONIA"] == pytest.approx(ensemble.predict(data).probabilities["PNEUMONIA"], abs=1e-6)
        wait_for(lambda: objects(orthanc, study, COMPREHENSIVE_SR), what=f"the SR of the {modality} image in Orthanc")
        (sr,) = objects(orthanc, study, COMPREHENSIVE_SR)
        assert sr.StudyInstanceUID == study and sr.SOPInstanceUID == row["sr"]
        assert sr.PatientID == pydicom.dcmread(io.BytesIO(data)).PatientID
        reference = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert reference.SeriesInstanceUID == series and reference.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop
        texts = _text_items(sr)
        assert texts["Algorithm Name"] == [identity.name]
        assert all(any(sha in t for t in texts["Algorithm Parameters"]) for _, _, sha in identity.members)
        assert any("not a diagnosis" in t for t in texts["Comment"])
        assert texts["Finding"][0].startswith(row["label"])
        if can_explain:
            wait_for(lambda: objects(orthanc, study, SECONDARY_CAPTURE), what="the overlay SC")
            (sc,) = objects(orthanc, study, SECONDARY_CAPTURE)
            assert sc.StudyInstanceUID == study and sc.PhotometricInterpretation == "RGB"
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sop
            # What the PACS holds passes dciodvfy (dicom3tools) with no error, SC and SR alike.
            for kind, sop_class in (("sc", SECONDARY_CAPTURE), ("sr", COMPREHENSIVE_SR)):
                stored = tmp_path / f"{modality}-{kind}.dcm"
                stored.write_bytes(orthanc.instances_of_class(study, sop_class)[0])
                errors, _ = dciodvfy(stored)
                assert errors == [], (modality, kind, errors)
        else:
            assert not objects(orthanc, study, SECONDARY_CAPTURE)
    # dcmtk reads the SR as a valid structured report.
    dsrdump = require_program("dsrdump", install_hint="apt-get install -y dcmtk")
    sr_file = tmp_path / "sr.dcm"
    sr_file.write_bytes(orthanc.instances_of_class(uids_of(sources["DX"])[0], COMPREHENSIVE_SR)[0])
    dumped = subprocess.run([dsrdump, str(sr_file)], capture_output=True, text=True, check=True).stdout
    assert "Comprehensive SR" in dumped and "Probability of PNEUMONIA" in dumped


def test_heatmaps_send_the_overlay_as_a_secondary_capture_in_the_same_study(orthanc: Orthanc, node_factory, tmp_path: Path) -> None:
    explain_models = pytest.importorskip("tests.explain_models", reason="the heatmap test models are not in this checkout")
    from pneumoedge.preprocessing import PreprocessSpec

    model = load(explain_models.map_model(tmp_path / "map.onnx", PreprocessSpec(height=64, width=64, color="gray", resize="area")))
    assert model.can_explain
    node, name = node_factory(model=model, heatmaps=True)
    data = chest_instance(modality="DX", seed=8)
    study, _, sop = uids_of(data)
    orthanc.push(name, [orthanc.upload(data)])
    wait_for(lambda: len(objects(orthanc, study, SECONDARY_CAPTURE)) == 1 and objects(orthanc, study, COMPREHENSIVE_SR), what="SC and SR")
    (sc,) = objects(orthanc, study, SECONDARY_CAPTURE)
    expected = model.predict(data, explain=True).overlay(max_side=1024)
    assert sc.StudyInstanceUID == study and sc.SeriesInstanceUID != uids_of(data)[1]
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape == expected.shape
    assert abs(sc.pixel_array.astype(int) - expected.astype(int)).max() <= 1
    (row,) = rows_of(node)
    assert row["SOPInstanceUID"] == sop and row["status"] == "ok"


def test_non_chest_instance_gets_a_skipped_row_and_no_sr(orthanc: Orthanc, node_factory) -> None:
    node, name = node_factory()
    data = chest_instance(modality="DX", body_part="KNEE", seed=3)
    study, _, sop = uids_of(data)
    orthanc.push(name, [orthanc.upload(data)])
    wait_for(lambda: len(rows_of(node)) == 1, what="the skipped row")
    (row,) = rows_of(node)
    assert row["SOPInstanceUID"] == sop and row["status"] == "skipped"
    assert "BodyPartExamined is KNEE, not a chest" in row["error"] and row["sr"] == ""
    time.sleep(0.5)
    assert not objects(orthanc, study, COMPREHENSIVE_SR) and not node.outbox.pending()


def _jpeg_lossless(orthanc: Orthanc, seed: int) -> bytes:
    """A JPEG Lossless instance (Orthanc's transcoder), not stored in Orthanc."""
    original = chest_instance(modality="CR", sixteen_bit=True, seed=seed)
    temporary = orthanc.upload(original)
    keep = ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
    data = orthanc.request("POST", f"/instances/{temporary}/modify", {"Transcode": JPEG_LOSSLESS_SV1, "Keep": keep, "Force": True}, raw=True)
    orthanc.request("DELETE", f"/instances/{temporary}")
    assert pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    return data


def test_jpeg_lossless_in_orthanc_arrives_decodable_and_is_classified(orthanc: Orthanc, node_factory) -> None:
    node, name = node_factory()
    data = _jpeg_lossless(orthanc, seed=4)
    study, _, sop = uids_of(data)
    instance = orthanc.upload(data)
    assert orthanc.get(f"/instances/{instance}/metadata/TransferSyntax", raw=True).decode() == JPEG_LOSSLESS_SV1
    orthanc.push(name, [instance])
    wait_for(lambda: len(rows_of(node)) == 1, what="the JPEG Lossless row")
    (row,) = rows_of(node)
    # Offered only what pydicom can decode here, Orthanc converted it (or a decoder is installed).
    assert row["SOPInstanceUID"] == sop and row["status"] == "ok", row
    wait_for(lambda: objects(orthanc, study, COMPREHENSIVE_SR), what="its SR")


def test_undecodable_jpeg_lossless_in_the_spool_is_an_error_row_that_says_why(orthanc: Orthanc, ensemble, tmp_path: Path) -> None:
    from pneumoedge.pacs.receive import decodable_transfer_syntaxes

    if JPEG_LOSSLESS_SV1 in decodable_transfer_syntaxes():
        pytest.skip("a JPEG Lossless decoder is installed: such files are classified, not refused")
    from pneumoedge.pacs.ledger import Ledger
    from pneumoedge.pacs.send import Outbox
    from pneumoedge.pacs.spool import Spool
    from pneumoedge.pacs.worker import Worker

    data = _jpeg_lossless(orthanc, seed=5)
    spool = Spool(tmp_path / "spool")
    spool.put(uids_of(data)[2], data)
    ledger = Ledger(tmp_path / "results.jsonl", "jsonl", ensemble.labels, [m.name for m in ensemble.members])
    ledger.open()
    Worker(ensemble, spool, ledger, Outbox(tmp_path)).process_available()
    ledger.close()
    (row,) = read_rows(ledger.path)
    assert row["status"] == "error" and "JPEG Lossless" in row["error"] and "pip install pylibjpeg pylibjpeg-libjpeg" in row["error"]
    # The PACS hears back: an SR saying the image was not analysed, in its study.
    (sr_file,) = Outbox(tmp_path).pending()
    sr = pydicom.dcmread(sr_file)
    assert sr.SOPInstanceUID == row["sr"] and sr.StudyInstanceUID == uids_of(data)[0]
    assert any(report.NOT_ANALYSED in t for t in _text_items(sr)["Finding"])


def test_every_offered_compressed_syntax_orthanc_can_write_decodes_to_the_same_result(orthanc: Orthanc, ensemble) -> None:
    """What the node offers must really decode (8- and 12-bit), not just have a decoder listed."""
    from pneumoedge.pacs.receive import decodable_transfer_syntaxes

    tried = []
    for sixteen_bit in (False, True):
        data = chest_instance(modality="CR", sixteen_bit=sixteen_bit, seed=40)
        reference = ensemble.predict(data).probabilities["PNEUMONIA"]
        instance = orthanc.upload(data)
        for syntax in decodable_transfer_syntaxes()[2:]:
            try:
                encoded = orthanc.request("POST", f"/instances/{instance}/modify", {"Transcode": syntax, "Force": True, "Keep": ["SOPInstanceUID"]}, raw=True)
            except Exception:  # noqa: BLE001 - Orthanc 1.10 cannot write this syntax (RLE, JPEG 2000, 12-bit baseline)
                continue
            assert pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
            lossy = syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.81")
            got = ensemble.predict(encoded).probabilities["PNEUMONIA"]
            assert got == pytest.approx(reference, abs=0.02 if lossy else 1e-6), syntax
            tried.append(syntax)
        orthanc.request("DELETE", f"/instances/{instance}")
    assert "1.2.840.10008.1.2.4.80" in tried  # JPEG-LS lossless, 8- and 12-bit


def test_same_instance_pushed_twice_gives_one_row_and_one_sr(orthanc: Orthanc, node_factory) -> None:
    node, name = node_factory()
    data = chest_instance(modality="DX", seed=6)
    study, _, _ = uids_of(data)
    instance = orthanc.upload(data)
    orthanc.push(name, [instance])
    wait_for(lambda: len(rows_of(node)) == 1 and not node.outbox.pending(), what="the first result")
    orthanc.push(name, [instance])
    wait_for(lambda: node.worker.stats.duplicates == 1, what="the duplicate to be noticed")
    assert len(rows_of(node)) == 1
    assert len(objects(orthanc, study, COMPREHENSIVE_SR)) == 1


def test_allow_refuses_unknown_calling_ae_and_echo_answers(orthanc: Orthanc, node_factory) -> None:
    from pynetdicom import AE

    node, name = node_factory(allow=[f"ORTHANC@{HOST}"])
    for calling, called, accepted in (("STRANGER", "PNEUMOEDGE", False), ("ORTHANC", "NOT_US", False), ("ORTHANC", "PNEUMOEDGE", True)):
        ae = AE(ae_title=calling)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate(HOST, node.receiver.bound_port, ae_title=called)
        assert assoc.is_established == accepted, (calling, called)
        if accepted:
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
    # Orthanc itself (calling AE ORTHANC from 127.0.0.1) gets in; known to Orthanc under another called AE title, it does not.
    assert orthanc.request("POST", f"/modalities/{name}/echo", {})  == {}
    orthanc.add_modality("PE_WRONG_AET", "NOT_PNEUMOEDGE", node.receiver.bound_port)
    with pytest.raises(Exception):
        orthanc.request("POST", "/modalities/PE_WRONG_AET/echo", {})


def test_check_echoes_the_destination(orthanc: Orthanc, tmp_path: Path) -> None:
    args = ["listen", "--out", str(tmp_path / "r"), "--host", HOST, "--port", str(free_port()), "--check"]
    ok = runner.invoke(app, [*args, "--send-to", f"{orthanc.aet}@{HOST}:{orthanc.dicom_port}"])
    assert ok.exit_code == 0 and "C-ECHO to ORTHANC" in ok.output, ok.output
    wrong = runner.invoke(app, [*args, "--send-to", f"WRONG@{HOST}:{orthanc.http_port}"])
    assert wrong.exit_code == 2 and wrong.output.count("error:") == 1, wrong.output


def _send_from_modality(port: int, datasets: list[bytes]) -> None:
    """C-STORE instances into the node as a modality would (with Orthanc down)."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate(HOST, port, ae_title="PNEUMOEDGE")
    assert assoc.is_established
    for data in datasets:
        assert assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))).Status == 0x0000
    assoc.release()


def test_orthanc_down_while_results_pending_every_sr_arrives_once(orthanc: Orthanc, node_factory, tmp_path: Path) -> None:
    node, _ = node_factory()
    sources = [chest_instance(modality="DX", seed=20 + i) for i in range(3)]
    studies = [uids_of(d)[0] for d in sources]
    orthanc.stop()
    try:
        _send_from_modality(node.receiver.bound_port, sources)
        wait_for(lambda: len(rows_of(node)) == 3, what="three rows while Orthanc is down")
        wait_for(lambda: node.sender.stats.last_error != "", what="a failed send attempt")
        assert len(node.outbox.pending()) == 3
    finally:
        orthanc.start()
    wait_for(lambda: not node.outbox.pending(), what="the outbox to empty after Orthanc is back")
    for study in studies:
        wait_for(lambda: objects(orthanc, study, COMPREHENSIVE_SR), what="an SR")
    time.sleep(1.0)
    assert [len(objects(orthanc, s, COMPREHENSIVE_SR)) for s in studies] == [1, 1, 1]
    # Re-sending everything (send-results --all) is harmless: the PACS keeps one copy of each.
    result = runner.invoke(app, ["send-results", str(node.config.out), "--to", f"{orthanc.aet}@{HOST}:{orthanc.dicom_port}", "--all"])
    assert result.exit_code == 0 and "sent 3 result object(s)" in result.output, result.output
    assert [len(objects(orthanc, s, COMPREHENSIVE_SR)) for s in studies] == [1, 1, 1]


def _listener(out: Path, port: int, orthanc: Orthanc, log: Path) -> subprocess.Popen:
    script = Path(sys.executable).with_name("pneumoedge")
    command = [str(script), "listen", "--out", str(out), "--host", HOST, "--port", str(port), "--retry-max", "0.5",
               "--send-to", f"{orthanc.aet}@{HOST}:{orthanc.dicom_port}"]
    with open(log, "wb") as stream:
        process = subprocess.Popen(command, stderr=stream, stdout=subprocess.DEVNULL)
    wait_for(lambda: process.poll() is not None or b"listening as" in log.read_bytes(), timeout=60, what="the listener")
    assert process.poll() is None, log.read_text()
    return process


def test_kill_9_during_a_burst_then_restart_gives_exactly_one_row_and_sr_each(orthanc: Orthanc, tmp_path: Path) -> None:
    out, port = tmp_path / "node", free_port()
    orthanc.add_modality("PE_BURST", "PNEUMOEDGE", port)
    study = pydicom.uid.generate_uid()
    burst = [chest_instance(modality="DX", seed=100 + i, size=384, study_uid=study, patient_name="Secret^Carol") for i in range(30)]
    ids = [orthanc.upload(data) for data in burst]
    process = _listener(out, port, orthanc, tmp_path / "listen-1.log")
    results = out / "results.jsonl"
    pusher = threading.Thread(target=lambda: _quiet(lambda: orthanc.push("PE_BURST", ids)))
    pusher.start()
    wait_for(lambda: results.exists() and len(results.read_bytes().splitlines()) >= 1, what="the first row")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    rows_at_kill = len(read_rows(results))
    spooled_at_kill = len(list((out / "spool").glob("*.dcm")))
    print(f"at kill -9: {rows_at_kill} rows, {spooled_at_kill} acknowledged instances waiting in the spool")
    pusher.join(120)
    assert rows_at_kill < 30, "the kill came after the burst; the test proves nothing"
    log = tmp_path / "listen-2.log"
    process = _listener(out, port, orthanc, log)
    try:
        orthanc.push("PE_BURST", ids)  # the PACS sends again what the dead node did not confirm (and more)
        wait_for(lambda: len(read_rows(results)) >= 30 and not list((out / "outbox").glob("*.dcm")), timeout=120, what="30 rows and an empty outbox")
        wait_for(lambda: len(objects(orthanc, study, COMPREHENSIVE_SR)) >= 30, timeout=60, what="30 SRs")
        time.sleep(1.0)
        rows = read_rows(results)
        assert len(rows) == 30 and {r["SOPInstanceUID"] for r in rows} == {uids_of(d)[2] for d in burst}
        srs = objects(orthanc, study, COMPREHENSIVE_SR)
        assert len(srs) == 30 and len({sr.SOPInstanceUID for sr in srs}) == 30
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    import socket

    with socket.socket() as again:  # the port was released: a new listener can bind it (as servers do, past TIME_WAIT)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((HOST, port))
        again.listen(1)
    text = log.read_text()
    first = (tmp_path / "listen-1.log").read_text()
    assert "Secret" not in first and "Carol" not in first
    assert code == 0 and "pneumoedge listen: received" in text and "never a diagnosis" in text
    assert "Secret" not in text and "Carol" not in text  # UIDs in the log, never patient names
    assert rows_at_kill < 30 and json.loads(results.read_text().splitlines()[0])["calling_ae"] == orthanc.aet


def _quiet(call: Callable[[], object]) -> None:
    """Run Orthanc's push; it fails part-way when the node is killed, which is the point."""
    try:
        call()
    except Exception:  # noqa: BLE001
        pass
