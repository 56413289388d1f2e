"""A DICOM Structured Report (Comprehensive 3D SR, TID 1500 "Imaging Measurement Report", built with highdicom) of
one answered question set about a DICOM slide, in the slide's study:

- the device observer: the bundle (name, version, SHA256 digest of its SHA256SUMS as serial number, encoder);
- per question, a measurement group (TID 1501) holding the question (TEXT "Request"), the answer (TEXT "Finding"),
  the confidence when the answer carries one (NUM "Certainty of Impression"), its warnings (TEXT "Comment") and the
  algorithm identification (bundle name, version, digest, encoder, precision);
- per evidence tile, a planar ROI group (TID 1410): the tile as a closed POLYLINE SCOORD on the base image of the
  source series, in its total pixel matrix (pixel origin VOLUME), and its weight as NUM "Saliency".
"""

from __future__ import annotations

import numpy as np

from .answers import ReportedAnswer, Tile
from .errors import DicomOutError
from .identity import ModelIdentity
from .sources import SourceSeries

SERIES_NUMBER = 9001  # the report's series (the source images keep theirs)
SERIES_DESCRIPTION = "locpath answers (AI-generated, not verified)"


def _codes():
    from pydicom.sr.codedict import codes

    return codes


def algorithm(identity: ModelIdentity):
    import highdicom as hd

    params = [f"{k}={v}" for k, v in identity.parameters().items()]
    return hd.sr.AlgorithmIdentification(name=identity.name, version=identity.version, parameters=params,
                                         family=_codes().cid7162.ArtificialIntelligence, manufacturer="locpath")


def _observation(identity: ModelIdentity, device_uid: str):
    import highdicom as hd

    codes = _codes()
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid, name=identity.name[:64], manufacturer_name="locpath", model_name=identity.encoder[:64],
        serial_number=identity.sha256)
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _text(name, value: str):
    import highdicom as hd

    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def question_group(i: int, a: ReportedAnswer, identity: ModelIdentity):
    """The question's measurement group: question, answer, confidence, warnings, algorithm."""
    import highdicom as hd

    codes = _codes()
    measurements = []
    if a.confidence is not None:
        measurements.append(hd.sr.Measurement(name=codes.DCM.CertaintyOfImpression, value=a.confidence,
                                              unit=codes.UCUM.NoUnits))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"question {i}"),
        algorithm_id=algorithm(identity), measurements=measurements or None)
    items = group[0].ContentSequence
    items.append(_text(codes.DCM.Request, a.question or "(empty)"))
    items.append(_text(codes.DCM.Finding, a.answer or "(no answer)"))
    notes = list(a.warnings) + (["abstained: the model abstained from answering"] if a.abstained else [])
    for note in notes:
        items.append(_text(codes.DCM.Comment, note))
    return group


def rectangle(t: Tile, size: tuple[int, int]) -> np.ndarray:
    """The tile's corners (column, row) in the total pixel matrix, clipped to it, clockwise from top-left."""
    x0, y0 = min(max(t.x, 0), size[0]), min(max(t.y, 0), size[1])
    x1, y1 = min(t.x + t.size, size[0]), min(t.y + t.size, size[1])
    if x1 <= x0 or y1 <= y0:
        raise DicomOutError(f"evidence tile at ({t.x}, {t.y}) lies outside the source image ({size[0]}x{size[1]})")
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def tile_group(i: int, j: int, t: Tile, source: SourceSeries, identity: ModelIdentity):
    import highdicom as hd

    codes = _codes()
    corners = rectangle(t, source.size)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=np.vstack([corners, corners[:1]]),
        source_image=hd.sr.SourceImageForRegion(str(source.base.SOPClassUID), str(source.base.SOPInstanceUID)),
        pixel_origin_interpretation=hd.sr.PixelOriginInterpretationValues.VOLUME)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"question {i} evidence tile {j}"),
        referenced_region=region, algorithm_id=algorithm(identity),
        measurements=[hd.sr.Measurement(name=codes.DCM.Saliency, value=t.weight, unit=codes.UCUM.NoUnits)])


def build_sr(source: SourceSeries, identity: ModelIdentity, answers: list[ReportedAnswer]):
    """The report as a pydicom Dataset (highdicom Comprehensive3DSR) in the source's study, a new series."""
    import highdicom as hd

    if not answers:
        raise DicomOutError("a report needs at least one answer")
    groups = []
    for i, a in enumerate(answers, 1):
        groups.append(question_group(i, a, identity))
        groups.extend(tile_group(i, j, t, source, identity) for j, t in enumerate(a.tiles, 1))
    report = hd.sr.MeasurementReport(
        observation_context=_observation(identity, hd.UID()), procedure_reported=_codes().cid100.ImagingProcedure,
        imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=source.instances, content=report[0], series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="locpath", is_complete=True,
        series_description=SERIES_DESCRIPTION, manufacturer_model_name=identity.name[:64],
        software_versions=identity.software[:64], device_serial_number=identity.sha256)
