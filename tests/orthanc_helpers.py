"""A real Orthanc PACS for tests and benchmarks, run as a plain process, plus DICOM test instances.

Orthanc (Debian's `orthanc`, 1.10) is started as `Orthanc CONFIG.json` with its own storage
folders in a temporary directory, free ports, no plugins and no remote access; never the
system service. It binds every interface (1.10 has no bind option), so it is only ever
addressed on 127.0.0.1. It is stopped by its process id with SIGTERM (about 3.5 s).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import numpy as np

ORTHANC_AET = "ORTHANC"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class OrthancError(RuntimeError):
    pass


class Orthanc:
    """One Orthanc process; `start()`/`stop()` may be repeated (same storage, same ports)."""

    def __init__(self, root: Path, program: str = "Orthanc") -> None:
        self.root = Path(root)
        self.program = program
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.aet = ORTHANC_AET
        self.process: Optional[subprocess.Popen] = None
        self.modalities: dict[str, dict[str, Any]] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "orthanc.json"
        self.config.write_text(json.dumps(self.configuration(), indent=2))

    def configuration(self) -> dict[str, Any]:
        return {
            "Name": "pneumoedge-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "Plugins": [],
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {},
            "StableAge": 1,
            "ConcurrentJobs": 2,
        }

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.root / "orthanc.log", "ab")
        self.process = subprocess.Popen([self.program, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # a busy port or locked storage: exit 255 at once
                raise OrthancError(f"Orthanc exited with {self.process.returncode}; see {self.root / 'orthanc.log'}")
            try:
                self.get("/system")
                break
            except (OSError, OrthancError):
                time.sleep(0.1)
        else:
            self.stop()
            raise OrthancError(f"Orthanc did not answer within {timeout} s")
        for name, entry in self.modalities.items():  # REST-declared modalities live in memory only
            self.request("PUT", f"/modalities/{name}", entry)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    # -- REST -----------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False, timeout: float = 120.0) -> Any:
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {exc.read()[:300]!r}") from None
        return payload if raw else json.loads(payload or b"null")

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def add_modality(self, name: str, aet: str, port: int) -> None:
        entry = {"AET": aet, "Host": HOST, "Port": port}
        self.modalities[name] = entry
        self.request("PUT", f"/modalities/{name}", entry)

    def upload(self, data: bytes) -> str:
        """Store one DICOM file; return its Orthanc instance id."""
        return self.request("POST", "/instances", data)["ID"]

    def push(self, modality: str, ids: list[str], timeout: float = 300.0) -> Any:
        return self.request(
            "POST", f"/modalities/{modality}/store", {"Resources": ids, "Synchronous": True}, timeout=timeout
        )

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study, with its main tags (what actually arrived)."""
        found = self.request(
            "POST", "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        )
        return found

    def instances_of_class(self, study_uid: str, sop_class_uid: str) -> list[bytes]:
        files = []
        for item in self.study_instances(study_uid):
            tags = self.get(f"/instances/{item['ID']}/simplified-tags")
            if tags.get("SOPClassUID") == sop_class_uid:
                files.append(self.get(f"/instances/{item['ID']}/file", raw=True))
        return files


def chest_instance(
    *,
    modality: str = "DX",
    body_part: str = "CHEST",
    sixteen_bit: bool = False,
    size: int = 256,
    seed: int = 0,
    study_uid: Optional[str] = None,
    patient_name: str = "Test^Phantom",
    kind: str = "bacteria",
) -> bytes:
    """A DX or CR DICOM instance of a synthetic phantom (not a patient), encoded as a file."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pneumoedge.datasets.phantoms import render_phantom

    pixels = render_phantom(np.random.default_rng(seed), kind, size, size, sixteen_bit=sixteen_bit)
    sop_class = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1"}[modality]
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = f"PID{seed:05d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = "20260101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = f"ACC{seed:05d}"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "pneumoedge tests"
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16 if sixteen_bit else 8
    ds.BitsStored = 12 if sixteen_bit else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def uids_of(data: bytes) -> tuple[str, str, str]:
    """(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) of an encoded instance."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy (Debian's dicom3tools) reports for a DICOM file: its "Error -" / "Warning -" lines.

    Skips the calling test when dciodvfy is missing, or fails it under PNEUMOEDGE_REQUIRE_SYSTEM_TOOLS=1.
    """
    from tests.system_tools import require_program

    program = require_program("dciodvfy", install_hint="apt-get install -y dicom3tools")
    run = subprocess.run([program, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [l for l in lines if l.startswith("Error -")], [l for l in lines if l.startswith("Warning -")]
