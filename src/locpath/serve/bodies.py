"""The JSON bodies of the native routes (pydantic, strict: unknown fields and lax types are refused with 400)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DicomWebSource(_Body):
    study: str
    series: str


class RegisterSlide(_Body):
    path: str | None = None
    dicomweb: DicomWebSource | None = None
    name: str | None = Field(default=None, max_length=256)
    client_key: str | None = Field(default=None, min_length=1, max_length=128)


class Ask(_Body):
    question: str = Field(min_length=1)
    # strict types: lax ones read "no" as false, true as 1 and "0.5" as 0.5 (the chat route refuses them too)
    stream: StrictBool = False
    max_new_tokens: StrictInt | None = Field(default=None, ge=1)
    sample: StrictBool = False
    temperature: StrictFloat | None = Field(default=None, gt=0, le=100)
    top_k: StrictInt | None = Field(default=None, ge=0)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    repetition_penalty: StrictFloat | None = Field(default=None, gt=0, le=100)
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    evidence_tiles: StrictInt = Field(default=32, ge=0, le=100000)
    abstain_below: StrictFloat | StrictInt | None = Field(default=None, ge=0, le=1)  # "uncertain" below it
    client_key: str | None = Field(default=None, min_length=1, max_length=128)

    def sampling(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, do_sample=self.sample or None, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
                    abstain_below=self.abstain_below)
