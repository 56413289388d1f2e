"""Microscopy Bulk Simple Annotations (highdicom `hd.ann`) of the evidence tiles: one annotation group per answer,
each tile a RECTANGLE in the slide's frame of reference (3D slide coordinates in mm, mapped from the base image's
total pixel matrix, where the pipeline reads tiles, by highdicom's ImageToReferenceTransformer), its weight as a
"Saliency" measurement, the algorithm (bundle name, version, digest, encoder, precision) identified on the group.
A viewer (Slim, QuPath's DICOM support) draws them over any level of the slide.

(2D total-pixel-matrix coordinates would be the other choice; Debian's dciodvfy (dicom3tools 2022) reports an
error on every 2D annotation object, CommonZCoordinateValue "only valid for 3D" although it is absent.)"""

from __future__ import annotations

import numpy as np

from .answers import ReportedAnswer
from .errors import DicomOutError
from .identity import ModelIdentity
from .sources import SourceSeries
from .sr import rectangle

SERIES_NUMBER = 9002
SERIES_DESCRIPTION = "locpath evidence tiles (AI-generated, not verified)"


def _group(i: int, a: ReportedAnswer, source: SourceSeries, identity: ModelIdentity):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(name=identity.name[:64], family=codes.cid7162.ArtificialIntelligence,
                                              version=identity.version[:64], parameters=identity.parameters())
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(source.base, for_total_pixel_matrix=True)
    weights = np.array([t.weight for t in a.tiles], dtype=np.float32)
    return hd.ann.AnnotationGroup(
        number=i, uid=hd.UID(), label=f"question {i} evidence", annotated_property_category=codes.SCT.Tissue,
        annotated_property_type=codes.SCT.Tissue, graphic_type=hd.ann.GraphicTypeValues.RECTANGLE,
        graphic_data=[to_slide(rectangle(t, source.size)) for t in a.tiles], algorithm_type="AUTOMATIC",
        algorithm_identification=algo, description=f"tiles that weighed most for: {a.question}"[:1024],
        measurements=[hd.ann.Measurements(name=codes.DCM.Saliency, values=weights, unit=codes.UCUM.NoUnits)])


def build_annotations(source: SourceSeries, identity: ModelIdentity, answers: list[ReportedAnswer]):
    """The annotations as a pydicom Dataset, in the source's study (a new series), referencing its base image."""
    import highdicom as hd

    groups = [_group(i, a, source, identity) for i, a in enumerate(answers, 1) if a.tiles]
    if not groups:
        raise DicomOutError("no evidence tile with a position to annotate (a feature file, or an empty slide)")
    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source.base], annotation_coordinate_type="3D", annotation_groups=groups,
        series_instance_uid=hd.UID(), series_number=SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="locpath", manufacturer_model_name=identity.name[:64], software_versions=identity.software[:64],
        device_serial_number=identity.sha256, content_description="evidence tiles"[:64],
        content_label="EVIDENCE", series_description=SERIES_DESCRIPTION)
