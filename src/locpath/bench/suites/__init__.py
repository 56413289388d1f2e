"""The bench's suites, in the order `run_bench` runs them (the throughput pass before torch is loaded; the
ceilings after the stages, whose throughput they read; batched after decoder_0.5b, whose graphs it decodes).
A new suite: one module here exposing `SUITE` (bench/suite.py) and one line below. Suites never import each
other (pyproject's import-linter contract): what two of them share lives in bench/."""

from . import (batched, ceilings, decoder_05b, encoder_conch, encoder_vit_b, encoder_vit_l, encoders_giant, headline,
               published, scaling, stages, throughput, torch_baselines)

SUITES = [
    stages.SUITE,
    ceilings.SUITE,
    throughput.SUITE,
    scaling.SUITE,
    headline.SUITE,
    torch_baselines.SUITE,
    decoder_05b.SUITE,
    batched.SUITE,
    published.SUITE,
    encoder_vit_b.SUITE,
    encoder_vit_l.SUITE,
    encoder_conch.SUITE,
    encoders_giant.SUITE,
]
