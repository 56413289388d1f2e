"""The one error kind of DICOM output."""

from ..errors import LocpathError


class DicomOutError(LocpathError):
    """A slide is not a DICOM WSI series, its headers cannot be used, or a DICOM object cannot be made or written."""
