"""What `locpath import` has read and decided before any weight is loaded, handed from `importer` to its two
writers (in memory, or tensor by tensor in `import_stream`) without the two modules importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from .inventory import TensorSource
from .keymap import FilePlan, KeyMap


@dataclass
class ReleaseFile:
    role: str
    source: TensorSource
    plan: FilePlan


@dataclass
class ImportInputs:
    """The files, checked before torch is imported: key map, LLM folder (config, tokenizer, chat template, weight
    shapes), the release files with their plans, and the LoRA source."""

    kmap: KeyMap | None
    hf: dict
    tok: object
    template: str
    template_from: str
    llm_shapes: dict[str, tuple[int, ...]] | None
    files: list[ReleaseFile]
    lora_src: TensorSource | None
    replaced_modules: list[str]  # a PEFT adapter's modules_to_save


@dataclass
class ImportPlan:
    """What the model on the meta device decided: the config, what each file fills (`check_plans`), the required
    tensors no file fills, the groups left random, and the parameter counts."""

    cfg: ModelConfig
    checked: dict
    missing: list[str]
    random_groups: list[str]
    llm_params: int
    total_params: int
