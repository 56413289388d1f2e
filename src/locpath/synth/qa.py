"""Questions and answers about synthetic slides: four question types, several phrasings each."""

from __future__ import annotations

import numpy as np

from .world import DIAGNOSES, GRADES, ORGANS, SlideSpec

TEMPLATES: dict[str, tuple[str, ...]] = {
    "diagnosis": (
        "What is the diagnosis?",
        "What is the most likely diagnosis for this slide?",
        "Based on this slide, what is the diagnosis?",
        "Give the diagnosis for this tissue.",
    ),
    "necrosis": (
        "Is necrosis present?",
        "Is there any necrosis in this slide?",
        "Do you see necrosis in this tissue?",
        "Does the tissue show necrosis?",
    ),
    "organ": (
        "What organ is this tissue from?",
        "Which organ does this slide come from?",
        "Identify the organ of origin.",
        "What is the tissue of origin?",
    ),
    "grade": (
        "What is the tumor grade?",
        "How would you grade this tumor?",
        "What grade is the lesion?",
        "Grade the tumor in this slide.",
    ),
}
QUESTION_TYPES = tuple(TEMPLATES)
ANSWERS: dict[str, tuple[str, ...]] = {
    "diagnosis": DIAGNOSES,
    "necrosis": ("yes", "no"),
    "organ": ORGANS,
    "grade": GRADES + ("no tumor",),
}
REPORT_PROMPT = "Describe this slide."


def answer(spec: SlideSpec, qtype: str) -> str:
    gt = spec.ground_truth()
    return {"diagnosis": gt["diagnosis"], "necrosis": gt["necrosis"], "organ": gt["organ"], "grade": gt["grade"]}[qtype]


def report(spec: SlideSpec) -> str:
    """The caption used for alignment: every slide-level fact in one sentence."""
    gt = spec.ground_truth()
    tumour = "benign" if spec.diagnosis == "benign" else f"{gt['diagnosis']}, {gt['grade']}"
    nec = "necrosis present" if spec.necrosis else "no necrosis"
    return f"{gt['organ']} tissue; {tumour}; {nec}."


def questions_for(spec: SlideSpec, rng: np.random.Generator | None = None) -> list[dict]:
    """One question per type, phrasing drawn from rng (default: seeded by the slide)."""
    rng = rng or np.random.default_rng([spec.seed, 31337])
    return [
        {"type": t, "question": TEMPLATES[t][rng.integers(len(TEMPLATES[t]))], "answer": answer(spec, t)}
        for t in QUESTION_TYPES
    ]


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def corpus() -> list[str]:
    """Every question, answer and report fragment: what the tokenizer is trained on."""
    lines = [q for qs in TEMPLATES.values() for q in qs] + [a for ans in ANSWERS.values() for a in ans]
    lines.append(REPORT_PROMPT)
    for o in ORGANS:
        for d in DIAGNOSES:
            for g in GRADES if d != "benign" else (None,):
                for n in (True, False):
                    tumour = "benign" if d == "benign" else f"{d}, {g}"
                    lines.append(f"{o} tissue; {tumour}; {'necrosis present' if n else 'no necrosis'}.")
    return lines
