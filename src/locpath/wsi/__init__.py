"""Slides in: open, find tissue, tile at a target resolution, stream tiles, feature files."""

from .features import FeatureFile, read_features, write_features
from .grid import GridConfig, TileGrid, build_grid
from .reader import TileBatch, TileReader
from .factory import check_slide_file, open_slide
from .slide import ArraySlide, Slide, SlideInfo
from .tissue import TissueConfig, TissueMask, detect_tissue

__all__ = [
    "ArraySlide", "FeatureFile", "GridConfig", "Slide", "SlideInfo", "TileBatch", "TileGrid", "TileReader",
    "TissueConfig", "TissueMask", "build_grid", "check_slide_file", "detect_tissue", "open_slide", "read_features",
    "write_features",
]
