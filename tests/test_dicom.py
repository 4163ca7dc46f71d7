"""DICOM inputs: rendered like a viewer (modality LUT, VOI, MONOCHROME1), refused clearly otherwise."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom")

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import JPEGLSLossless, RLELossless  # noqa: E402

from pneumoedge.imageio import ImageError, read_pixels  # noqa: E402
from pneumoedge.preprocessing import PreprocessSpec, preprocess  # noqa: E402
from pneumoedge.runtime.folder import discover  # noqa: E402
from tests.input_files import dicom_bytes  # noqa: E402

# 12-bit data in 16-bit words: 0..4095, every value present.
TWELVE = (np.arange(64 * 64) % 4096).astype(np.uint16).reshape(64, 64)
MIN_MAX = TWELVE.astype(np.float64) / 4095 * 255
_CACHED_DICOM = dicom_bytes(TWELVE, bits_stored=12)


def test_monochrome2_without_window_is_min_max_to_0_255() -> None:
    pixels = read_pixels(dicom_bytes(TWELVE, bits_stored=12))
    assert pixels.dtype == np.float32 and pixels.shape == (64, 64)
    np.testing.assert_allclose(pixels, MIN_MAX, atol=1e-3)


def test_monochrome1_is_inverted_to_monochrome2() -> None:
    pixels = read_pixels(dicom_bytes(TWELVE, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_allclose(pixels, 255 - MIN_MAX, atol=1e-3)


def test_bits_stored_masks_bits_above_it() -> None:
    # An overlay or garbage in the 4 unused high bits must not change the image.
    noisy = TWELVE | np.uint16(0xA000)
    np.testing.assert_array_equal(read_pixels(dicom_bytes(noisy, bits_stored=12)), read_pixels(dicom_bytes(TWELVE, bits_stored=12)))


def test_rescale_then_linear_window() -> None:
    # Stored 0..4095 -> HU = 2 * stored - 1024 (-1024..7166); window centre 0, width 401.
    data = dicom_bytes(TWELVE, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=401)
    pixels = read_pixels(data)
    hu = TWELVE.astype(np.float64) * 2 - 1024
    expected = np.clip((hu + 0.5) / 400 + 0.5, 0, 1) * 255  # PS3.3 C.11.2.1.2.1 with c=0, w=401
    np.testing.assert_allclose(pixels, expected, atol=1e-3)
    assert pixels[hu < -200].max() == 0 and pixels[hu > 200].min() == 255
    assert pixels[TWELVE == 512][0] == pytest.approx(127.5 + 0.5 / 400 * 255, abs=1e-3)  # HU 0, the centre


def test_multi_valued_window_uses_the_first_and_sigmoid_is_honoured() -> None:
    first = read_pixels(dicom_bytes(TWELVE, bits_stored=12, WindowCenter=[1000, 3000], WindowWidth=[500, 100]))
    single = read_pixels(dicom_bytes(TWELVE, bits_stored=12, WindowCenter=1000, WindowWidth=500))
    np.testing.assert_array_equal(first, single)
    sigmoid = read_pixels(dicom_bytes(TWELVE, bits_stored=12, WindowCenter=1000, WindowWidth=500, VOILUTFunction="SIGMOID"))
    np.testing.assert_allclose(sigmoid, 255 / (1 + np.exp(-4 * (TWELVE - 1000.0) / 500)), atol=1e-3)


def test_voi_lut_sequence_wins_over_window() -> None:
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new(0x00283006, "US", list(range(255, -1, -1)))  # LUT Data: an inverting LUT
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    pixels = read_pixels(dicom_bytes(ramp, VOILUTSequence=Sequence([item]), WindowCenter=10, WindowWidth=2))
    np.testing.assert_allclose(pixels, 255.0 - ramp, atol=1e-3)


def test_rgb_dicom_keeps_its_colours() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    pixels = read_pixels(dicom_bytes(rgb, photometric="RGB"))
    assert pixels.shape == (20, 30, 3)
    np.testing.assert_array_equal(pixels, rgb.astype(np.float32))


def test_preamble_less_dicom_is_read() -> None:
    data = dicom_bytes(TWELVE, bits_stored=12, preamble=False)
    assert data[128:132] != b"DICM"
    np.testing.assert_allclose(read_pixels(data), MIN_MAX, atol=1e-3)


def test_compressed_dicom_with_a_decoder_matches_uncompressed() -> None:
    ds = dcmread(io.BytesIO(dicom_bytes(TWELVE, bits_stored=12)))
    ds.compress(RLELossless)  # RLE is encoded and decoded by pydicom itself
    out = io.BytesIO()
    ds.save_as(out)
    np.testing.assert_array_equal(read_pixels(out.getvalue()), read_pixels(dicom_bytes(TWELVE, bits_stored=12)))


def test_compressed_dicom_without_decoder_names_the_package() -> None:
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    data = dicom_bytes(TWELVE, bits_stored=12, syntax=JPEGLSLossless, pixel_data=encapsulate([b"\x00" * 64]))
    with pytest.raises(ImageError, match=r"compressed DICOM \(JPEG-LS Lossless.*no decoder.*pip install .*pylibjpeg"):
        read_pixels(data)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("multiframe", "multi-frame DICOM (3 frames) is not supported"),
        ("report", "DICOM object with no image (Basic Text SR"),
        ("dicomdir", "a DICOMDIR (the index of a DICOM export), not an image"),
        ("huge", "declared size 65535x65535"),
        ("truncated", "cannot read the DICOM pixel data: The number of bytes of pixel data is less than expected"),
        ("not_dicom", "DICOM object with no image"),
        ("ct", "modality CT (computed tomography) is not a projection radiograph (CR or DX)"),
        ("mr", "modality MR (magnetic resonance) is not a projection radiograph"),
    ],
)
def test_dicom_that_is_not_one_image_is_refused_per_file(kind: str, message: str) -> None:
    stack = np.zeros((3, 8, 8), np.uint16)
    data = {
        "multiframe": lambda: dicom_bytes(stack[0], pixel_data=stack.tobytes(), NumberOfFrames=3),
        "report": lambda: dicom_bytes(None, sop_class="1.2.840.10008.5.1.4.1.1.88.11"),
        "dicomdir": lambda: dicom_bytes(None, sop_class="1.2.840.10008.1.3.10"),
        "huge": lambda: dicom_bytes(TWELVE, Rows=65535, Columns=65535),
        "truncated": lambda: dicom_bytes(TWELVE)[:-100],
        "not_dicom": lambda: b"\x00" * 128 + b"DICM" + b"\xff" * 40,
        "ct": lambda: dicom_bytes(TWELVE, bits_stored=12, Modality="CT"),
        "mr": lambda: dicom_bytes(TWELVE, bits_stored=12, Modality="MR"),
    }[kind]()
    with pytest.raises(ImageError) as caught:
        read_pixels(data)
    assert message in str(caught.value)


@pytest.mark.parametrize("modality", ["CR", "DX", "OT", None])
def test_radiograph_modalities_and_a_missing_one_are_read(modality) -> None:
    from pneumoedge.dicom import not_a_radiograph

    data = dicom_bytes(TWELVE, bits_stored=12, Modality=modality) if modality else _without_modality()
    assert not_a_radiograph(dcmread(io.BytesIO(data))) == ""
    np.testing.assert_allclose(read_pixels(data), MIN_MAX, atol=1e-3)


def _without_modality() -> bytes:
    ds = dcmread(io.BytesIO(_CACHED_DICOM))
    del ds.Modality
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_without_pydicom_the_error_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(ImageError, match=r"pip install 'pneumoedge\[dicom\]'"):
        read_pixels(_CACHED_DICOM)


def test_dicom_tensor_ignores_high_bit_depth_and_matches_rendering() -> None:
    spec = PreprocessSpec(height=64, width=64, scale=1.0)
    tensor = preprocess(_CACHED_DICOM, spec)
    np.testing.assert_allclose(tensor[:, :, 0], MIN_MAX, atol=1e-3)
    full_range = preprocess(_CACHED_DICOM, PreprocessSpec(height=64, width=64, scale=1.0, high_bit_depth="full_range"))
    np.testing.assert_array_equal(tensor, full_range)


def test_discovery_finds_dicom_by_suffix_and_by_content(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(_CACHED_DICOM)
    (tmp_path / "IM000001").write_bytes(_CACHED_DICOM)  # PACS export: no suffix
    (tmp_path / "1.2.840.113619.2.55.3.4").write_bytes(_CACHED_DICOM)  # named by UID: suffix ".4"
    (tmp_path / "DICOMDIR").write_bytes(dicom_bytes(None, sop_class="1.2.840.10008.1.3.10"))
    (tmp_path / "notes").write_text("x" * 200)
    found = {p.name: (kind, reason) for p, kind, reason in discover([tmp_path])}
    assert found["a.dcm"][0] == found["IM000001"][0] == found["1.2.840.113619.2.55.3.4"][0] == "image"
    assert found["DICOMDIR"] == ("skipped", "DICOMDIR: the index of a DICOM export, not an image")
    assert found["notes"] == ("skipped", "not an image file (no suffix)")


def test_signed_pixels_with_rescale() -> None:
    signed = (np.arange(64 * 64) % 4096 - 2048).astype(np.int16).reshape(64, 64)
    data = dicom_bytes(signed, bits_stored=12, PixelRepresentation=1, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=-1000, WindowWidth=2001)
    expected = np.clip((signed - 1000.0 + 1000.5) / 2000 + 0.5, 0, 1) * 255
    np.testing.assert_allclose(read_pixels(data), expected, atol=1e-3)


def test_runtime_tensors_equal_training_tensors_for_dicom(bundle_dir: Path, tmp_path: Path) -> None:
    import pneumoedge

    path = tmp_path / "scan.dcm"
    path.write_bytes(dicom_bytes(TWELVE, bits_stored=12, photometric="MONOCHROME1", WindowCenter=1500, WindowWidth=2000))
    model = pneumoedge.load(bundle_dir)
    runtime = model.tensors(model.decode(str(path)))
    for member, tensor in zip(model.members, runtime):
        np.testing.assert_array_equal(tensor, preprocess(path, member.card.spec))  # what training feeds Keras
    assert model.predict(str(path)).status == "ok"


def test_palette_color_dicom_goes_through_its_lut() -> None:
    index = (np.arange(64).reshape(8, 8) % 4).astype(np.uint8)
    channels = {"Red": [0, 65535, 0, 0], "Green": [0, 0, 65535, 0], "Blue": [0, 0, 0, 65535]}
    attributes = {}
    for colour, values in channels.items():
        attributes[f"{colour}PaletteColorLookupTableDescriptor"] = [4, 0, 16]
        attributes[f"{colour}PaletteColorLookupTableData"] = np.asarray(values, np.uint16).tobytes()
    pixels = read_pixels(dicom_bytes(index, photometric="PALETTE COLOR", **attributes))
    expected = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float32)[index]
    np.testing.assert_array_equal(pixels, expected)


def test_spec_dicom_voi_min_max_ignores_the_files_window() -> None:
    windowed = dicom_bytes(TWELVE, bits_stored=12, WindowCenter=1000, WindowWidth=100)
    spec = PreprocessSpec(height=64, width=64, scale=1.0, dicom_voi="min_max")
    np.testing.assert_allclose(preprocess(windowed, spec)[:, :, 0], MIN_MAX, atol=1e-3)
    assert not np.allclose(preprocess(windowed, PreprocessSpec(height=64, width=64, scale=1.0))[:, :, 0], MIN_MAX)


def test_dicom_voi_is_left_out_of_json_at_its_default_so_old_manifests_match() -> None:
    assert "dicom_voi" not in PreprocessSpec().to_dict()
    spec = PreprocessSpec(dicom_voi="min_max")
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert PreprocessSpec.from_dict({"height": 8, "width": 8}).dicom_voi == "file"
    with pytest.raises(Exception, match="dicom_voi must be one of"):
        PreprocessSpec(dicom_voi="window")


def test_training_scan_takes_dicom_and_feeds_the_same_tensor(tmp_path: Path) -> None:
    from pneumoedge.datasets.kaggle import scan

    for label, name in (("NORMAL", "IM-0001-0001.dcm"), ("PNEUMONIA", "person1_bacteria_1.dcm")):
        folder = tmp_path / "train" / label
        folder.mkdir(parents=True)
        (folder / name).write_bytes(_CACHED_DICOM)
    samples = scan(tmp_path, "train")
    assert [s.path.suffix for s in samples] == [".dcm", ".dcm"]
    assert [s.label for s in samples] == ["NORMAL", "PNEUMONIA"]
    spec = PreprocessSpec(height=32, width=32)
    expected = preprocess(_CACHED_DICOM, spec)
    np.testing.assert_array_equal(preprocess(samples[0].path, spec), expected)


def _bare(syntax_little: bool, explicit: bool = True) -> bytes:
    """TWELVE as a bare data set (no preamble, no file meta), in the given byte order."""
    from pydicom.filewriter import dcmwrite

    ds = dcmread(io.BytesIO(dicom_bytes(TWELVE, bits_stored=12, preamble=False)), force=True)
    ds.PixelData = TWELVE.astype("<u2" if syntax_little else ">u2").tobytes()  # OW words in the file's byte order
    out = io.BytesIO()
    dcmwrite(out, ds, implicit_vr=not explicit, little_endian=syntax_little, force_encoding=True)
    return out.getvalue()


@pytest.mark.parametrize("little, explicit", [(True, True), (True, False), (False, True)])
def test_bare_data_sets_little_and_big_endian_are_read(little: bool, explicit: bool) -> None:
    from pneumoedge.dicom import sniff_dicom

    data = _bare(little, explicit)
    assert data[128:132] != b"DICM" and sniff_dicom(data[:1024]) == "dicom"
    np.testing.assert_allclose(read_pixels(data), MIN_MAX, atol=1e-3)


def test_sniff_knows_a_dicomdir_by_content_and_ignores_other_bytes() -> None:
    from pneumoedge.dicom import sniff_dicom

    assert sniff_dicom(dicom_bytes(None, sop_class="1.2.840.10008.1.3.10")[:1024]) == "dicomdir"
    assert sniff_dicom(_CACHED_DICOM[:1024]) == "dicom"
    assert sniff_dicom(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200) == ""
    assert sniff_dicom(b"\x00" * 1024) == "" and sniff_dicom(b"") == ""


def _pydicom_test_files() -> Path:
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files"
    if not (folder / "dicomdirtests").is_dir():
        pytest.skip(f"pydicom's test files are not in this install ({folder})")
    return folder


def test_dicomdirs_of_pydicom_are_found_by_content_whatever_their_names() -> None:
    folder = _pydicom_test_files() / "dicomdirtests"
    found = {p.name: (kind, reason) for p, kind, reason in discover([folder])}
    dicomdirs = {name for name, (kind, reason) in found.items() if reason.startswith("DICOMDIR")}
    # pydicom ships DICOMDIR-bigEnd, -empty.dcm, -implicit, -nooffset, -nopatient, -reordered besides DICOMDIR.
    assert {"DICOMDIR", "DICOMDIR-bigEnd", "DICOMDIR-empty.dcm", "DICOMDIR-implicit", "DICOMDIR-reordered"} <= dicomdirs
    assert all(found[name][0] == "skipped" for name in dicomdirs)
    assert found["6154"][0] == "image"  # a CR image of that export, named by number


def test_infer_over_pydicoms_test_files_one_row_each_and_a_quiet_stderr(tmp_path: Path) -> None:
    """pydicom's own odd files (big endian, DICOMDIRs, JPEG 2000, truncated ...): one row per file, no noise."""
    import csv
    import subprocess

    folder = _pydicom_test_files()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    out = tmp_path / "rows.csv"
    script = Path(sys.executable).with_name("pneumoedge")
    run = subprocess.run([str(script), "infer", str(folder), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stderr
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in files)
    ours = ("error ", "skipped ", "… and ")  # infer's own per-file lines and summary
    noise = [
        line for line in run.stderr.splitlines()
        if not line.startswith(ours) and any(w in line for w in ("Traceback", "pydicom", "Warning", "WARNING", "ERROR"))
    ]
    assert not noise, run.stderr
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["DICOMDIR-empty.dcm"]["status"] == "skipped"
    assert "RT Ion Plan" in by_name["ExplVR_BigEndNoMeta.dcm"]["error"]  # read as DICOM (big endian, no preamble)
    assert "modality CT" in by_name["CT_small.dcm"]["error"]
    print(f"{len(rows)} rows: " + ", ".join(f"{s} {n}" for s, n in sorted(__import__('collections').Counter(r['status'] for r in rows).items())))


def test_pydicoms_complaints_go_into_the_reason_once() -> None:
    import logging

    class Seen(logging.Handler):
        records: list = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    seen = Seen()
    logging.getLogger().addHandler(seen)  # where pydicom's records would go (a CLI's stderr handler)
    try:
        with pytest.raises(ImageError) as caught:
            read_pixels(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    finally:
        logging.getLogger().removeHandler(seen)
    message = str(caught.value)
    assert "(pydicom: " in message and message.count("End of file reached before delimiter") == 1
    assert not [r for r in seen.records if r.name.startswith("pydicom")]  # collected, not logged


def test_a_decoder_failure_names_what_else_to_install() -> None:
    path = _pydicom_test_files() / "GDCMJ2K_TextGBR.dcm"  # JPEG 2000 that Pillow's OpenJPEG refuses
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    if list(get_decoder(JPEG2000Lossless).available_plugins) != ["pillow"]:
        pytest.skip("another JPEG 2000 decoder than Pillow is installed")
    with pytest.raises(ImageError) as caught:
        read_pixels(path)
    assert "with the installed decoder (pillow)" in str(caught.value)
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in str(caught.value) and "pip install python-gdcm" in str(caught.value)
