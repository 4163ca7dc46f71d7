"""The DICOM node's parts without a PACS: spool, ledger, chest rules, SR/SC content, worker, CLI errors."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from pneumoedge.cli import app  # noqa: E402
from pneumoedge.pacs import report  # noqa: E402
from pneumoedge.pacs.ledger import Ledger, read_rows  # noqa: E402
from pneumoedge.pacs.send import Outbox, parse_destination  # noqa: E402
from pneumoedge.pacs.spool import Spool, key_of  # noqa: E402
from pneumoedge.pacs.worker import Worker, not_chest_reason  # noqa: E402
from pneumoedge import Prediction, load  # noqa: E402
from pneumoedge.runtime.results import ResultWriter  # noqa: E402
from tests.orthanc_helpers import chest_instance, free_port, uids_of  # noqa: E402

runner = CliRunner()
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def ensemble():
    return load()


def _header(data: bytes):
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def _content(sr) -> list[tuple[str, str, object]]:
    """(value type, concept meaning, value) of the SR's first-level items."""
    items = []
    for item in sr.ContentSequence:
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "TEXT":
            items.append(("TEXT", meaning, item.TextValue))
        elif item.ValueType == "NUM":
            items.append(("NUM", meaning, float(item.MeasuredValueSequence[0].NumericValue)))
        elif item.ValueType == "IMAGE":
            items.append(("IMAGE", meaning, item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return items


def test_spool_keeps_arrival_order_and_drops_half_written_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    for uid in ("1.2.3", "1.2.1", "1.2.2"):
        spool.put(uid, uid.encode())
    (spool.folder / ".tmp-123-1-1.9.9.dcm").write_bytes(b"half")
    assert [key_of(p) for p in spool.pending()] == ["1.2.3", "1.2.1", "1.2.2"]
    reopened = Spool(tmp_path / "spool")
    assert not list(reopened.folder.glob(".tmp-*"))
    assert [p.read_bytes() for p in reopened.pending()] == [b"1.2.3", b"1.2.1", b"1.2.2"]


def test_result_writer_default_columns_unchanged_and_extra_columns_appended(tmp_path: Path) -> None:
    plain = ResultWriter("csv", ["NORMAL", "PNEUMONIA"], ["m"])
    extra = ResultWriter("csv", ["NORMAL", "PNEUMONIA"], ["m"], extra_columns=["SOPInstanceUID", "calling_ae"])
    assert extra.header == plain.header.rstrip("\n") + ",SOPInstanceUID,calling_ae\n"
    out = tmp_path / "r.jsonl"
    writer = ResultWriter("jsonl", ["NORMAL", "PNEUMONIA"], ["m"], extra_columns=["SOPInstanceUID"])
    writer.open(out)
    writer.write(Prediction(source="x", status="skipped", error="why"), {"SOPInstanceUID": "1.2"})
    writer.close()
    assert json.loads(out.read_text())["SOPInstanceUID"] == "1.2"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_ledger_reads_back_done_uids_and_drops_a_cut_off_row(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"results.{fmt}"
    ledger = Ledger(path, fmt, ["NORMAL", "PNEUMONIA"], ["m"])
    assert ledger.open() == set()
    for uid, status in (("1.1", "ok"), ("1.2", "error"), ("1.3", "skipped")):
        ledger.write(Prediction(source=uid, status=status, label="NORMAL" if status == "ok" else None), {"SOPInstanceUID": uid})
    ledger.close()
    with open(path, "ab") as handle:  # a crash in the middle of a row
        handle.write(b'{"path": "1.4", "status": "o')
    again = Ledger(path, fmt, ["NORMAL", "PNEUMONIA"], ["m"])
    assert again.open() == {"1.1", "1.2", "1.3"}
    again.write(Prediction(source="1.4", status="ok", label="NORMAL"), {"SOPInstanceUID": "1.4"})
    again.close()
    rows = read_rows(path)
    assert [r["SOPInstanceUID"] for r in rows] == ["1.1", "1.2", "1.3", "1.4"]


def test_ledger_refuses_a_csv_of_another_model(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    first = Ledger(path, "csv", ["NORMAL", "PNEUMONIA"], ["m"])
    first.open()
    first.close()
    with pytest.raises(Exception, match="columns differ"):
        Ledger(path, "csv", ["A", "B", "C"], ["m"]).open()


@pytest.mark.parametrize(
    "tags, reason",
    [
        ({"Modality": "DX", "BodyPartExamined": "CHEST"}, ""),
        ({"Modality": "CR", "BodyPartExamined": "THORAX"}, ""),
        ({"Modality": "DX"}, ""),
        ({"Modality": "DX", "BodyPartExamined": "HAND"}, "BodyPartExamined is HAND"),
        ({"Modality": "CT", "BodyPartExamined": "CHEST"}, "modality CT"),
        ({"BodyPartExamined": "CHEST"}, ""),  # the receiver takes only CR/DX classes; the tag may be absent
        ({"Modality": "MR"}, "modality MR (magnetic resonance) is not a projection radiograph"),
        ({"Modality": "DX", "BodyPartExamined": "CHEST", "NumberOfFrames": 3}, "multi-frame (3 frames)"),
    ],
)
def test_chest_rules(tags: dict, reason: str) -> None:
    ds = pydicom.Dataset()
    for key, value in tags.items():
        setattr(ds, key, value)
    found = not_chest_reason(ds)
    assert (found == "") if not reason else (reason in found)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ORTHANC@127.0.0.1:4242", ("ORTHANC", "127.0.0.1", 4242)),
        ("PACS 1@pacs.local:104", ("PACS 1", "pacs.local", 104)),
        ("ORTHANC@127.0.0.1", None),
        ("127.0.0.1:4242", None),
        ("ORTHANC@127.0.0.1:70000", None),
        ("A_TITLE_LONGER_THAN_16@h:1", None),
    ],
)
def test_parse_destination(text: str, expected) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="AET@host:port"):
            parse_destination(text)
    else:
        dest = parse_destination(text)
        assert (dest.aet, dest.host, dest.port) == expected


def test_sr_says_what_how_sure_which_model_and_points_at_the_image(ensemble) -> None:
    data = chest_instance(modality="CR", sixteen_bit=True, seed=3)
    source = _header(data)
    prediction = ensemble.predict(data)
    identity = report.model_identity(ensemble)
    sr = report.build_sr(source, prediction, identity)
    encoded = io.BytesIO()
    sr.save_as(encoded, enforce_file_format=True)
    sr = pydicom.dcmread(io.BytesIO(encoded.getvalue()))
    assert sr.SOPClassUID == COMPREHENSIVE_SR
    assert (sr.StudyInstanceUID, sr.PatientID, sr.AccessionNumber) == (source.StudyInstanceUID, source.PatientID, source.AccessionNumber)
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SOPInstanceUID != source.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
    items = _content(sr)
    numbers = {meaning: value for kind, meaning, value in items if kind == "NUM"}
    texts = [(meaning, value) for kind, meaning, value in items if kind == "TEXT"]
    for label, p in prediction.probabilities.items():
        assert numbers[f"Probability of {label}"] == pytest.approx(p, abs=1e-9)
    assert numbers["Decision threshold"] == pytest.approx(ensemble.threshold)
    assert ("Algorithm Name", ensemble.manifest.name) in texts
    manifest_shas = {(m.name, m.precision): m.sha256 for m in ensemble.manifest.members}
    for member in ensemble.members:
        sha = manifest_shas[(member.name, member.precision)]
        assert any(sha in value and member.name in value for meaning, value in texts if meaning == "Algorithm Parameters")
    finding = next(value for meaning, value in texts if meaning == "Finding")
    assert finding.startswith(prediction.label)
    comments = " ".join(value for meaning, value in texts if meaning == "Comment")
    assert "not a diagnosis" in comments and "synthetic phantoms" in comments
    assert ("IMAGE", "Source of Measurement", source.SOPInstanceUID) in items
    # The same image and model give the same UIDs (re-sending is harmless); another image does not.
    again = report.build_sr(source, prediction, identity)
    assert again.SOPInstanceUID == sr.SOPInstanceUID
    other = report.build_sr(_header(chest_instance(seed=4, study_uid=source.StudyInstanceUID)), prediction, identity)
    assert other.SOPInstanceUID != sr.SOPInstanceUID and other.SeriesInstanceUID == sr.SeriesInstanceUID


def test_sr_for_a_header_without_optional_patient_and_study_attributes(ensemble) -> None:
    source = _header(chest_instance(seed=7))
    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyTime"):
        delattr(source, keyword)
    prediction = ensemble.predict(chest_instance(seed=7))
    sr = report.build_sr(source, prediction, report.model_identity(ensemble))
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert "PatientBirthDate" not in source  # the header itself is left as it was


def test_sr_states_out_of_distribution_in_plain_words(ensemble) -> None:
    source = _header(chest_instance(seed=5))
    prediction = Prediction(
        source="x", status="ok", label="NORMAL", probability=0.8, probabilities={"NORMAL": 0.8, "PNEUMONIA": 0.2},
        threshold=0.5, ood=True, ood_score=9.0,
    )
    texts = [value for kind, _, value in _content(report.build_sr(source, prediction, report.model_identity(ensemble))) if kind == "TEXT"]
    assert report.OOD_NOTE in texts and "unlike the training images" in texts


def test_overlay_secondary_capture_lands_in_the_source_study(ensemble) -> None:
    source = _header(chest_instance(seed=6))
    overlay = np.zeros((60, 80, 3), np.uint8)
    overlay[..., 0] = np.arange(80, dtype=np.uint8)
    sc = report.build_sc(source, overlay, report.model_identity(ensemble))
    encoded = io.BytesIO()
    sc.save_as(encoded, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(encoded.getvalue()))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID
    assert back.PhotometricInterpretation == "RGB"
    np.testing.assert_array_equal(back.pixel_array, overlay)
    with pytest.raises(ValueError, match="RGB"):
        report.build_sc(source, overlay[..., 0], report.model_identity(ensemble))


def _spool_file(spool: Spool, data: bytes, calling_ae: str = "MODALITY") -> None:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.SourceApplicationEntityTitle = calling_ae
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    spool.put(str(ds.SOPInstanceUID), buffer.getvalue())


def test_worker_one_row_per_instance_duplicates_dropped_and_bad_files_reported(ensemble, tmp_path: Path) -> None:
    spool, outbox = Spool(tmp_path / "spool"), Outbox(tmp_path)
    ledger = Ledger(tmp_path / "results.jsonl", "jsonl", ensemble.labels, [m.name for m in ensemble.members])
    ledger.open()
    dx = chest_instance(modality="DX", seed=10)
    hand = chest_instance(modality="DX", body_part="HAND", seed=11)
    _spool_file(spool, dx)
    _spool_file(spool, hand)
    _spool_file(spool, dx)  # the PACS sent it twice
    spool.put("1.2.3.4", b"not dicom at all")
    worker = Worker(ensemble, spool, ledger, outbox)
    assert worker.process_available() == 4
    ledger.close()
    rows = {r["SOPInstanceUID"]: r for r in read_rows(ledger.path)}
    assert len(read_rows(ledger.path)) == 3 and not spool.pending()
    dx_uid, hand_uid = uids_of(dx)[2], uids_of(hand)[2]
    assert rows[dx_uid]["status"] == "ok" and rows[dx_uid]["calling_ae"] == "MODALITY" and rows[dx_uid]["sr"]
    assert rows[dx_uid]["probabilities"]["PNEUMONIA"] == pytest.approx(ensemble.predict(dx).probabilities["PNEUMONIA"], abs=1e-6)
    assert rows[hand_uid]["status"] == "skipped" and "HAND" in rows[hand_uid]["error"] and not rows[hand_uid]["sr"]
    assert rows["1.2.3.4"]["status"] == "error" and "DICOM header" in rows["1.2.3.4"]["error"]
    assert [key_of(p) for p in outbox.pending()] == [rows[dx_uid]["sr"]]
    assert worker.stats.duplicates == 1
    # A restart with the same instance still in the spool (killed before removing it): no second row.
    _spool_file(spool, dx)
    ledger2 = Ledger(ledger.path, "jsonl", ensemble.labels, [m.name for m in ensemble.members])
    ledger2.open()
    Worker(ensemble, spool, ledger2, outbox).process_available()
    ledger2.close()
    assert len(read_rows(ledger.path)) == 3 and len(outbox.pending()) == 1


def test_worker_survives_a_failure_and_retries_the_spooled_instance(ensemble, tmp_path: Path, monkeypatch) -> None:
    import threading

    spool, outbox = Spool(tmp_path / "spool"), Outbox(tmp_path)
    ledger = Ledger(tmp_path / "results.jsonl", "jsonl", ensemble.labels, [m.name for m in ensemble.members])
    ledger.open()
    worker = Worker(ensemble, spool, ledger, outbox)
    worker.retry_s = 0.1
    real = outbox.put
    failures = []

    def full_disk_once(uid, data):
        if not failures:
            failures.append(uid)
            raise OSError(28, "No space left on device")
        return real(uid, data)

    monkeypatch.setattr(outbox, "put", full_disk_once)
    _spool_file(spool, chest_instance(seed=12))
    thread = threading.Thread(target=worker.run)
    thread.start()
    deadline = time.monotonic() + 30
    while ledger.path.stat().st_size == 0 or not read_rows(ledger.path):
        assert time.monotonic() < deadline, "the instance was never processed after the failure"
        time.sleep(0.05)
    worker.stop()
    thread.join(10)
    ledger.close()
    (row,) = read_rows(ledger.path)
    assert failures and row["status"] == "ok" and row["sr"] and len(outbox.pending()) == 1 and not spool.pending()


def test_pipelined_worker_keeps_arrival_order_and_one_row_per_instance(ensemble, tmp_path: Path) -> None:
    import threading

    spool, outbox = Spool(tmp_path / "spool"), Outbox(tmp_path)
    ledger = Ledger(tmp_path / "results.jsonl", "jsonl", ensemble.labels, [m.name for m in ensemble.members])
    ledger.open()
    instances = [chest_instance(seed=30 + i, size=128) for i in range(10)]
    for data in instances + instances[:4]:  # four sent twice, the copies arriving while the first ones are in flight
        _spool_file(spool, data)
    worker = Worker(ensemble, spool, ledger, outbox, batch_size=3)
    thread = threading.Thread(target=worker.run)
    thread.start()
    deadline = time.monotonic() + 60
    while spool.pending():
        assert time.monotonic() < deadline, "the spool was not drained"
        time.sleep(0.05)
    worker.stop()
    thread.join(30)
    ledger.close()
    rows = read_rows(ledger.path)
    assert [r["SOPInstanceUID"] for r in rows] == [uids_of(d)[2] for d in instances]
    assert worker.stats.duplicates == 4 and len(outbox.pending()) == 10


def test_a_results_folder_belongs_to_one_model(ensemble, bundle_dir: Path, tmp_path: Path) -> None:
    from pneumoedge.pacs.node import Node, NodeConfig
    from pneumoedge.runtime.results import OutputError

    config = NodeConfig(out=tmp_path / "node", host="127.0.0.1", port=free_port())
    Node(ensemble, config)
    Node(ensemble, config)  # the same model again: fine
    with pytest.raises(OutputError, match="another model"):
        Node(load(bundle_dir), config)


def test_outbox_replaces_an_older_copy_of_the_same_object(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.put("2.25.1", b"first")
    outbox.put("2.25.2", b"other")
    outbox.put("2.25.1", b"second")
    assert sorted(p.read_bytes() for p in outbox.pending()) == [b"other", b"second"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["listen", "--out", "{tmp}/r", "--send-to", "ORTHANC@localhost", "--check"], "AET@host:port"),
        (["listen", "--out", "{tmp}/r", "--aet", "A_TITLE_FAR_TOO_LONG", "--check"], "1 to 16 printable characters"),
        (["listen", "--out", "{tmp}/r", "--format", "xml", "--check"], "--format must be jsonl or csv"),
        (["listen", "--out", "{tmp}/r", "--model", "{tmp}/missing", "--check"], "no such model file"),
        (["listen", "--out", "{tmp}/r", "--host", "127.0.0.1", "--port", "{port}", "--send-to", "NOBODY@127.0.0.1:{port}", "--check"], "cannot connect"),
        (["listen", "--out", "{tmp}/r", "--host", "0.0.0.0", "--port", "{port}", "--check"], "say who may send with --allow"),
        (["listen", "--out", "{tmp}/r", "--host", "0.0.0.0", "--allow", "any,ORTHANC", "--check"], "--allow any cannot be combined"),
        (["listen", "--out", "{tmp}/r", "--allow", "A_TITLE_FAR_TOO_LONG_X", "--check"], "--allow 'A_TITLE_FAR_TOO_LONG_X'"),
        (["send-results", "{tmp}", "--to", "ORTHANC@127.0.0.1:4242"], "not a `pneumoedge listen --out` folder"),
        (["send-results", "{tmp}", "--to", "ORTHANC"], "AET@host:port"),
    ],
)
def test_cli_mistakes_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    port = str(free_port())
    args = [a.replace("{tmp}", str(tmp_path)).replace("{port}", port) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert any(line.startswith("error:") for line in result.output.splitlines())


def test_check_without_destination_says_results_stay_in_the_outbox(tmp_path: Path) -> None:
    result = runner.invoke(app, ["listen", "--out", str(tmp_path / "r"), "--host", "127.0.0.1", "--port", str(free_port()), "--check", "--heatmaps"])
    assert result.exit_code == 0, result.output
    assert "no --send-to" in result.output and "outbox" in result.output
    assert ("SRs only" in result.output) == (not load().can_explain)  # said when the model gives no heatmaps


def test_listening_beyond_this_computer_with_allow_any_is_accepted(tmp_path: Path) -> None:
    result = runner.invoke(app, ["listen", "--out", str(tmp_path / "r"), "--host", "0.0.0.0", "--port", str(free_port()), "--allow", "any", "--check"])
    assert result.exit_code == 0 and "0.0.0.0" in result.output, result.output


def test_check_reports_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["listen", "--out", str(tmp_path / "r"), "--host", "127.0.0.1", "--port", str(port), "--check"])
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in result.output, result.output
    assert os.path.isdir(tmp_path / "r")


# -- issue 19: result objects that pass dciodvfy --------------------------------------------------------


def _save(dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_sr_sc_and_error_sr_pass_dciodvfy_with_orientation_laterality_and_source_from_the_source(ensemble, tmp_path: Path) -> None:
    from tests.orthanc_helpers import dciodvfy

    source = _header(chest_instance(modality="DX", seed=21))
    source.PatientOrientation = ["R", "F"]  # an AP film shown as taken: the overlay must say the same
    source.ImageLaterality = "U"
    source.IssuerOfPatientID = "CLINIC"
    source.StudyDescription = "CHEST PA"
    identity = report.model_identity(ensemble)
    prediction = ensemble.predict(chest_instance(modality="DX", seed=21))
    overlay = np.zeros((60, 80, 3), np.uint8)
    objects = {
        "sr": report.build_sr(source, prediction, identity),
        "sc": report.build_sc(source, overlay, identity),
        "error_sr": report.build_error_sr(source, "cannot decode the compressed DICOM pixel data", identity),
    }
    for name, dataset in objects.items():
        errors, _ = dciodvfy(_save(dataset, tmp_path / f"{name}.dcm"))
        assert errors == [], (name, errors)
    sc = pydicom.dcmread(tmp_path / "sc.dcm")
    assert list(sc.PatientOrientation) == ["R", "F"] and sc.BodyPartExamined == "CHEST"
    assert (sc.IssuerOfPatientID, sc.StudyDescription) == ("CLINIC", "CHEST PA")
    (reference,) = sc.SourceImageSequence
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
    # A source that says nothing about orientation or body part: still no dciodvfy error.
    bare = _header(chest_instance(modality="CR", seed=22))
    del bare.PatientOrientation, bare.BodyPartExamined
    errors, _ = dciodvfy(_save(report.build_sc(bare, overlay, identity), tmp_path / "bare_sc.dcm"))
    assert errors == []
    error_texts = [t for k, m, t in _content(pydicom.dcmread(tmp_path / "error_sr.dcm")) if k == "TEXT" and m == "Finding"]
    assert error_texts == [f"{report.NOT_ANALYSED} cannot decode the compressed DICOM pixel data"]


def test_burned_in_overlay_text_carries_the_synthetic_model_caveat(ensemble) -> None:
    import dataclasses

    assert ensemble.can_explain and report.model_identity(ensemble).synthetic
    prediction = ensemble.predict(chest_instance(seed=23), explain=True)
    plain = report.overlay_of(prediction)
    cautioned = report.overlay_of(prediction, report.model_identity(ensemble))
    caption = prediction.explanation.caption
    assert report.SYNTHETIC_NOTE not in caption
    expected = dataclasses.replace(prediction.explanation, caption=(*caption, report.SYNTHETIC_NOTE)).overlay(1024)
    np.testing.assert_array_equal(cautioned, expected)
    assert cautioned.shape[0] > plain.shape[0]  # the text band grew by the caveat's line(s)


# -- issue 19: the sender ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, verdict",
    [
        (0x0000, "stored"), (0xB000, "stored"), (0xB007, "stored"), (0x0001, "stored"), (0x0111, "stored"),
        (0xA700, "transient"), (0xA7FF, "transient"), (0x0110, "transient"), (0x0213, "transient"), (None, "transient"),
        (0xA900, "permanent"), (0xA9AB, "permanent"), (0xC000, "permanent"), (0xC123, "permanent"),
        (0x0122, "permanent"), (0x0124, "permanent"), (0x0117, "permanent"),
    ],
)
def test_store_statuses_are_classified_by_their_dicom_class(code, verdict) -> None:
    from pneumoedge.pacs.send import classify_status

    assert classify_status(code) == verdict


class _ChoosyPacs:
    """A Storage SCP (pynetdicom) answering each SOP Instance UID with the statuses given, then success."""

    def __init__(self, answers: dict) -> None:
        from pynetdicom import AE, evt

        from pneumoedge.pacs.send import SC_CLASS, SR_CLASSES

        self.answers = {uid: list(codes) for uid, codes in answers.items()}
        self.stored: list[str] = []
        ae = AE(ae_title="CHOOSY")
        for uid in (*SR_CLASSES, SC_CLASS):
            ae.add_supported_context(uid)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        codes = self.answers.get(uid, [])
        if codes:
            return codes.pop(0)
        self.stored.append(uid)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_a_refused_object_moves_aside_and_the_queue_keeps_moving(ensemble, tmp_path: Path) -> None:
    from pneumoedge.pacs.send import FAILED_LOG, Destination, SendStats

    identity = report.model_identity(ensemble)
    srs = [report.build_error_sr(_header(chest_instance(seed=40 + i)), "test", identity) for i in range(4)]
    uids = [str(sr.SOPInstanceUID) for sr in srs]
    bad_data, busy, hiccup, fine = uids
    outbox = Outbox(tmp_path, max_attempts=3)
    for sr in srs:  # the refused one first: it must not hold up the others
        buffer = io.BytesIO()
        sr.save_as(buffer, enforce_file_format=True)
        outbox.put(str(sr.SOPInstanceUID), buffer.getvalue())
    pacs = _ChoosyPacs({bad_data: [0xA900], busy: [0xA700] * 10, hiccup: [0x0110]})
    try:
        destination = Destination("CHOOSY", "127.0.0.1", pacs.port)
        stats = SendStats()
        assert outbox.send_pending(destination, "PNEUMOEDGE", stats=stats) is False
        assert pacs.stored == [fine]
        assert [key_of(p) for p in outbox.failed_files()] == [bad_data]
        log = (outbox.failed / FAILED_LOG).read_text()
        assert bad_data[:20] in log and "0xA900" in log
        assert {key_of(p) for p in outbox.pending()} == {busy, hiccup}
        outbox.send_pending(destination, "PNEUMOEDGE", stats=stats)  # the hiccup passes; busy: attempt 2
        assert pacs.stored == [fine, hiccup] and [key_of(p) for p in outbox.pending()] == [busy]
        outbox.send_pending(destination, "PNEUMOEDGE", stats=stats)  # busy: attempt 3 of 3, moved aside
        assert not outbox.pending() and {key_of(p) for p in outbox.failed_files()} == {bad_data, busy}
        assert "not stored after 3 attempts (last status 0xA700)" in (outbox.failed / FAILED_LOG).read_text()
        # The PACS fixed: send-results --retry-failed sends both, failed/ empties.
        pacs.answers = {}
        result = runner.invoke(app, ["send-results", str(tmp_path), "--to", f"CHOOSY@127.0.0.1:{pacs.port}", "--retry-failed"])
        assert result.exit_code == 0, result.output
        assert sorted(pacs.stored) == sorted(uids) and not outbox.failed_files() and len(list(outbox.sent.glob("*.dcm"))) == 4
    finally:
        pacs.stop()


def test_sent_objects_are_removed_after_the_retention(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    old, new = outbox.sent / "old.dcm", outbox.sent / "new.dcm"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    assert outbox.prune_sent(None) == 0 and old.exists()
    assert outbox.prune_sent(2) == 1 and not old.exists() and new.exists()
    assert outbox.prune_sent(0) == 1 and not new.exists()


# -- issue 19: who may connect, and what is offered ---------------------------------------------------


def _associate(port: int, calling: str, called: str = "PNEUMOEDGE", syntaxes=None):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", syntaxes or ["1.2.840.10008.1.2.1"])
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_receiver_refuses_other_called_aet_and_calling_aet_or_address_not_allowed(tmp_path: Path) -> None:
    from pneumoedge.pacs.receive import Receiver

    receiver = Receiver(Spool(tmp_path / "spool"), aet="PNEUMOEDGE", host="127.0.0.1", port=0, allow=["ORTHANC", "CR_ROOM@127.0.0.1", "FAR@10.255.255.1"])
    receiver.start()
    try:
        port = receiver.bound_port
        for calling, called, accepted in (
            ("ORTHANC", "PNEUMOEDGE", True), ("CR_ROOM", "PNEUMOEDGE", True), ("STRANGER", "PNEUMOEDGE", False),
            ("FAR", "PNEUMOEDGE", False), ("ORTHANC", "SOMEONE_ELSE", False),
        ):
            assoc = _associate(port, calling, called)
            assert assoc.is_established == accepted and assoc.is_rejected == (not accepted), (calling, called)
            if accepted:
                assoc.release()
        assert receiver.refused_associations == 3
    finally:
        receiver.stop()


def test_only_tested_decoders_are_offered_jpeg_2000_is_refused_at_negotiation(tmp_path: Path) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLosslessSV1

    from pneumoedge.pacs.receive import Receiver, decodable_transfer_syntaxes

    offered = decodable_transfer_syntaxes()
    assert JPEG2000Lossless not in offered and JPEG2000 not in offered and JPEGLosslessSV1 not in offered
    if get_decoder(JPEG2000Lossless).is_available:  # pydicom would call Pillow enough; it is not (GDCMJ2K_TextGBR.dcm)
        assert list(get_decoder(JPEG2000Lossless).available_plugins) == ["pillow"]
    receiver = Receiver(Spool(tmp_path / "spool"), aet="PNEUMOEDGE", host="127.0.0.1", port=0)
    receiver.start()
    try:
        assoc = _associate(receiver.bound_port, "MODALITY", syntaxes=[JPEG2000Lossless, JPEG2000])
        assert assoc.is_established
        assert "1.2.840.10008.5.1.4.1.1.1.1" not in {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        assoc.release()
    finally:
        receiver.stop()


def test_an_image_that_cannot_be_decoded_gets_an_error_row_and_a_not_analysed_sr(ensemble, tmp_path: Path) -> None:
    spool, outbox = Spool(tmp_path / "spool"), Outbox(tmp_path)
    ledger = Ledger(tmp_path / "results.jsonl", "jsonl", ensemble.labels, [m.name for m in ensemble.members])
    ledger.open()
    data = chest_instance(modality="DX", seed=24)
    spool.put(uids_of(data)[2], data[:-500])  # pixel data cut short: the header reads, the image does not
    Worker(ensemble, spool, ledger, outbox).process_available()
    ledger.close()
    (row,) = read_rows(ledger.path)
    assert row["status"] == "error" and "pixel data" in row["error"] and row["sr"]
    (sr_file,) = outbox.pending()
    sr = pydicom.dcmread(sr_file)
    assert sr.SOPInstanceUID == row["sr"] and sr.StudyInstanceUID == uids_of(data)[0]
    finding = next(t for k, m, t in _content(sr) if m == "Finding")
    assert finding.startswith(report.NOT_ANALYSED) and "pixel data" in finding


def test_listen_log_has_no_pydicom_noise(tmp_path: Path) -> None:
    """`pneumoedge listen` as a process: pydicom's warnings and tracebacks stay out of its one-line-per-instance log."""
    import signal
    import subprocess
    import sys

    from pynetdicom import AE

    padded = pydicom.dcmread(io.BytesIO(chest_instance(modality="DX", seed=50, size=96)))
    padded.PixelData = padded.PixelData + b"\x00" * 200  # pydicom warns (logger and warnings) of excess padding
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(chest_instance(modality="DX", seed=51, size=96)[:-400])  # pixel data cut short: an error row
    out, port, log = tmp_path / "node", free_port(), tmp_path / "listen.log"
    script = Path(sys.executable).with_name("pneumoedge")
    with open(log, "wb") as stream:
        process = subprocess.Popen([str(script), "listen", "--out", str(out), "--port", str(port)], stderr=stream, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while b"listening as" not in log.read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOEDGE")
        assert assoc.is_established
        assert assoc.send_c_store(padded).Status == 0 and assoc.send_c_store(cut).Status == 0
        assoc.release()
        results = out / "results.jsonl"
        while not results.exists() or len(read_rows(results)) < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    rows = {r["status"]: r for r in read_rows(out / "results.jsonl")}
    assert set(rows) == {"ok", "error"} and rows["error"]["sr"]
    text = log.read_text()
    noise = ("pydicom:", "pydicom.", "Traceback", "UserWarning", "excess padding", "WARNING pydicom")
    assert not [n for n in noise if n in text], text
    assert text.count(" ok sop=") == 1 and text.count(" error sop=") == 1
