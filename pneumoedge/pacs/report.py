"""Result objects for the PACS: a Comprehensive SR per classified image and an overlay Secondary Capture.

Both are built by highdicom from the source image's header, so patient and study identifiers
are copied and the objects land in the source study, each in a new series. Their UIDs are
derived from the source SOP Instance UID and the model's identity: the same image classified
again by the same model gives the same SR UID, so a re-send is a duplicate the PACS ignores,
never a second report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pneumoedge import __version__
from pneumoedge.runtime.ensemble import Ensemble, Prediction

DECISION_SUPPORT = "Decision support for clinicians, not a diagnosis."
OOD_NOTE = "This image is unlike this model's training images: do not rely on this result."
SYNTHETIC_NOTE = "The model was trained on synthetic phantoms, not on patients: a demonstration, not clinically validated."
NOT_ANALYSED = "Not analysed: the image could not be read or decoded by pneumoedge."
NOT_ANALYSED_NOTE = "No result was computed for this image; it needs reading as usual."
MANUFACTURER = "pneumoedge"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
_SCHEME = "99PNEUMOEDGE"
_NAMESPACE = uuid.UUID("5b0f7f52-3d1c-4e55-9a55-70b1c2a0e9d1")  # pneumoedge result objects


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a result: the model's name and version and each member's file checksum."""

    name: str
    version: str
    members: tuple[tuple[str, str, str], ...]  # (name, precision, sha256)
    synthetic: bool

    @property
    def key(self) -> str:
        """One string that changes whenever any member file changes (feeds the result UIDs)."""
        return "|".join([self.name, *(sha for _, _, sha in self.members)])


def model_identity(ensemble: Ensemble) -> ModelIdentity:
    manifest = ensemble.manifest
    if manifest is not None:
        recorded = {(m.name, m.precision): m.sha256 for m in manifest.members}  # checked at load
        members = tuple(
            (m.name, m.precision, recorded.get((m.name, m.precision)) or _sha256(Path(m.source))) for m in ensemble.members
        )
        synthetic = bool(manifest.provenance.get("synthetic", False))
        return ModelIdentity(manifest.name, f"pneumoedge {__version__}", members, synthetic)
    members = tuple((m.name, m.precision, _sha256(Path(m.source))) for m in ensemble.members)
    return ModelIdentity("+".join(m.name for m in ensemble.members), f"pneumoedge {__version__}", members, False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def derived_uid(*parts: str) -> str:
    """A UID that is a pure function of `parts`: a name-based UUID in the 2.25 form (PS3.5 B.2).

    (pydicom's `generate_uid(prefix=None, ...)` ignores its entropy sources and is random.)
    """
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(parts)).int}"


def sr_uids(source: Any, identity: ModelIdentity) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR for `source`: one SR series per study and model."""
    return (
        derived_uid("pneumoedge-sr-series", str(source.StudyInstanceUID), identity.key),
        derived_uid("pneumoedge-sr", str(source.SOPInstanceUID), identity.key),
    )


def sc_uids(source: Any, identity: ModelIdentity) -> tuple[str, str]:
    return (
        derived_uid("pneumoedge-sc-series", str(source.StudyInstanceUID), identity.key),
        derived_uid("pneumoedge-sc", str(source.SOPInstanceUID), identity.key),
    )


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _text(name, value: str):
    from highdicom.sr import RelationshipTypeValues, TextContentItem

    return TextContentItem(name=name, value=value[:1024], relationship_type=RelationshipTypeValues.CONTAINS)


def _num(name, value: float):
    from highdicom.sr import NumContentItem, RelationshipTypeValues

    unit = _code("1", "UCUM", "no units")
    return NumContentItem(name=name, value=float(value), unit=unit, relationship_type=RelationshipTypeValues.CONTAINS)


def notes(prediction: Prediction, identity: ModelIdentity) -> list[str]:
    """The plain-words cautions that go with every result."""
    lines = [DECISION_SUPPORT]
    if prediction.ood:
        lines.append(OOD_NOTE)
    if identity.synthetic:
        lines.append(SYNTHETIC_NOTE)
    return lines


#: Type 2 patient/study attributes highdicom reads from the evidence; many real images leave some out.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(source: Any) -> Any:
    """The header, with absent type 2 patient/study attributes present and empty (the source is not changed)."""
    from pydicom.dataset import Dataset

    missing = [keyword for keyword in _TYPE2 if keyword not in source]
    if not missing:
        return source
    filled = Dataset()
    filled.update(source)  # a new element map sharing the elements, which are not changed
    for keyword in missing:
        setattr(filled, keyword, "")
    return filled


def build_sr(source: Any, prediction: Prediction, identity: ModelIdentity) -> Any:
    """A Comprehensive SR for one classified image (`source`: its pydicom header)."""
    finding = f"{prediction.label} (probability {prediction.probability:.3f}"
    finding += f", decision threshold {prediction.threshold:.3f})" if prediction.threshold is not None else ")"
    items = [_text(_code("121071", "DCM", "Finding"), finding)]
    for label, probability in prediction.probabilities.items():
        items.append(_num(_code(f"P-{label}"[:16], _SCHEME, f"Probability of {label}"), probability))
    if prediction.threshold is not None:
        items.append(_num(_code("THRESHOLD", _SCHEME, "Decision threshold"), prediction.threshold))
    if prediction.disagreement is not None:
        items.append(_num(_code("DISAGREEMENT", _SCHEME, "Ensemble members' disagreement"), prediction.disagreement))
    if prediction.ood is not None:
        words = "unlike the training images" if prediction.ood else "like the training images"
        items.append(_text(_code("OOD", _SCHEME, "Out-of-distribution check"), words))
    return _report(source, identity, items, notes(prediction, identity))


def build_error_sr(source: Any, reason: str, identity: ModelIdentity) -> Any:
    """A Comprehensive SR saying that the image could not be analysed, and why (no label, no probability).

    Sent for an `error` row whose header could be read, so the PACS hears back for every image
    it sent, not only for those that were classified.
    """
    items = [_text(_code("121071", "DCM", "Finding"), f"{NOT_ANALYSED} {reason}")]
    return _report(source, identity, items, [NOT_ANALYSED_NOTE])


def _report(source: Any, identity: ModelIdentity, items: list, comments: list[str]) -> Any:
    """The SR around `items`: model identity, `comments`, the image reference; in the source's study."""
    import highdicom as hd
    from highdicom.sr import ContainerContentItem, ImageContentItem, RelationshipTypeValues

    source = _with_type2(source)
    series_uid, sop_uid = sr_uids(source, identity)
    root = ContainerContentItem(name=_code("18748-4", "LN", "Diagnostic imaging report"))
    items = list(items)
    items.append(_text(_code("111001", "DCM", "Algorithm Name"), identity.name))
    items.append(_text(_code("111003", "DCM", "Algorithm Version"), identity.version))
    for name, precision, sha in identity.members:
        items.append(_text(_code("111002", "DCM", "Algorithm Parameters"), f"member {name} ({precision}) sha256 {sha}"))
    for line in comments:
        items.append(_text(_code("121106", "DCM", "Comment"), line))
    items.append(
        ImageContentItem(
            name=_code("121112", "DCM", "Source of Measurement"),
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    root.ContentSequence = items
    return hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="pneumoedge result (decision support, not a diagnosis)",
        manufacturer_model_name=identity.name[:64],
        software_versions=identity.version,
    )


def build_sc(source: Any, overlay: np.ndarray, identity: ModelIdentity) -> Any:
    """A Secondary Capture of the heatmap overlay (uint8 RGB) in the source's study.

    Patient and study attributes are copied as in the SR; orientation and laterality come from
    the source (the overlay is the source image resized, with a text band below); the source
    is named in SourceImageSequence.
    """
    import highdicom as hd

    source = _with_type2(source)
    series_uid, sop_uid = sc_uids(source, identity)
    overlay = np.ascontiguousarray(overlay, dtype=np.uint8)
    if overlay.ndim != 3 or overlay.shape[2] != 3:
        raise ValueError(f"an overlay must be (H, W, 3) uint8 RGB, got shape {overlay.shape}")
    orientation = _orientation(source)
    laterality = _laterality(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        # highdicom insists on a biped pair; an unknown orientation is written empty below.
        patient_orientation=orientation or ("L", "F"),
        laterality=laterality or None,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description="pneumoedge heatmap (decision support, not a diagnosis)",
        software_versions=identity.version,
    )
    sc.copy_patient_and_study_information(source)  # IssuerOfPatientID, StudyDescription, ... as the SR has
    if orientation is None:
        raw = source.get("PatientOrientation")
        sc.PatientOrientation = raw if raw else ""  # Type 2: as the source says, or empty (unknown)
    part = str(source.get("BodyPartExamined", "") or "").strip()
    if part:
        sc.BodyPartExamined = part
    if not laterality and not part:
        sc.Laterality = ""  # Type 2C: without a body part, whether it is paired is unknown: present, empty
    sc.SourceImageSequence = [_source_image(source)]
    sc.DerivationDescription = "Heatmap overlay of the source image by pneumoedge; decision support, not a diagnosis"
    return sc


def _orientation(source: Any) -> Optional[tuple[str, str]]:
    """The source's PatientOrientation when it is a pair highdicom accepts (single letters), else None."""
    from highdicom import PatientOrientationValuesBiped

    value = source.get("PatientOrientation")
    parts = [str(v).strip().upper() for v in value] if value and not isinstance(value, str) else []
    if len(parts) != 2:
        return None
    try:
        return tuple(PatientOrientationValuesBiped(p).value for p in parts)  # type: ignore[return-value]
    except ValueError:
        return None


def _laterality(source: Any) -> str:
    """R or L when the source says so (Laterality, else ImageLaterality), else ""."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return ""


def _source_image(source: Any) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = str(source.SOPClassUID)
    item.ReferencedSOPInstanceUID = str(source.SOPInstanceUID)
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121322", "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def warm_up(ensemble: Ensemble) -> None:
    """Build one throw-away SR so highdicom loads its standard tables (about 1-2 s) before the first image."""
    from pydicom.dataset import Dataset

    source = Dataset()
    source.StudyInstanceUID = source.SeriesInstanceUID = source.SOPInstanceUID = derived_uid("warm-up")
    source.SOPClassUID, source.Modality = "1.2.840.10008.5.1.4.1.1.1.1", "DX"
    label = ensemble.labels[0]
    prediction = Prediction(source="warm-up", status="ok", label=label, probability=1.0, probabilities={label: 1.0}, threshold=ensemble.threshold)
    build_sr(source, prediction, model_identity(ensemble))


def overlay_of(prediction: Prediction, identity: Optional[ModelIdentity] = None) -> Optional[np.ndarray]:
    """The prediction's heatmap overlay (RGB), or None when it has no heatmap.

    For a model trained on synthetic phantoms the burned-in text carries the same caveat as the SR.
    """
    explanation = getattr(prediction, "explanation", None)
    if explanation is None:
        return None
    if identity is not None and identity.synthetic:
        explanation = dataclasses.replace(explanation, caption=(*explanation.caption, SYNTHETIC_NOTE))
    try:
        return np.asarray(explanation.overlay(max_side=1024))
    except ValueError:  # no heatmap for this prediction: an answer, not a failure
        return None


def _instance_number(source: Any) -> int:
    try:
        return max(1, int(source.get("InstanceNumber", 1) or 1))
    except (TypeError, ValueError):
        return 1
