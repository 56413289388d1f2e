"""A synthetic slide world with known answers: specs, rendering, slide files, questions."""

from .qa import QUESTION_TYPES, TEMPLATES, questions_for, report
from .world import SlideSpec, make_spec, render_levels, render_region
from .writer import truth_path, write_slide

__all__ = ["QUESTION_TYPES", "TEMPLATES", "SlideSpec", "make_spec", "questions_for", "render_levels",
           "render_region", "report", "truth_path", "write_slide"]
