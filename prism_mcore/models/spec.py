"""One spec per model family: everything the rest of prism_mcore may know about a model.

A family (Qwen3 with its MoE variant, Qwen3-VL with its MoE variant) lives in its own folder under
models/ and exposes one `ModelSpec` object. Convert, upcycle, weight sync, the vLLM engine, the memory
estimator, the discriminator and the trainer reach the model only through it, so no family's tensor
names, shapes or layouts appear outside its folder. (torchtitan's TrainSpec is the idea: a registry of
named specs, each bundling the builders and the HF state-dict adapter of one model.)

A spec works on an *architecture* object, `spec.arch(model_config)`: the family's full description of
one model (for Qwen3 the `ModelConfig` itself; for Qwen3-VL the text `ModelConfig` plus the vision tower).
What it says:

  config     `model_fields(hf_config_json)` -> ModelConfig fields (pure JSON); `matches(model_config)`;
             `arch(model_config)`; `hf_config(arch)` (a config.json for a model with no source directory)
  build      `build(arch, parallel, discriminator=False)` -> the local pipeline stage (a Megatron module;
             `discriminator=True`: untied, rotary driven by per-token positions)
  forward    `forward_inputs(arch, tokens, attention_mask, position_ids, packed_seq_lengths, pixel_values,
             image_grid_thw)` -> (position_ids, extra keyword arguments) for `model(tokens, positions, mask,
             **extra)`; the same call serves the policy and the discriminator backbone
  adapter    HF <-> Megatron names and layouts: `hf_shapes`, `megatron_reader` (HF -> only the requested
             region of a Megatron tensor), `hf_views` / `hf_tensors` (Megatron -> HF; the views are what
             weight sync streams to the engines), `is_layered`, `expert_layouts`
  tokenizer  `tokenizer(hf_dir)`, `processor(arch)` (images -> pixel values; None for text families)
  memory     `param_counts(model_config, ...)`, `layer_activation_elements(...)`, `extra_memory(...)`
             (pure arithmetic, no torch: `prism validate` uses it)
  engines    `engine_kwargs(arch)` for vLLM (multimodal limits), `upcycle(dense_dir, out_dir, ...)`

Specs are looked up by family name, by an HF config.json (`model_type`) or by a ModelConfig. This module
and the families' spec modules import nothing heavy at import time (no torch, no Megatron).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator

# family name -> (HF model_type values, module whose SPEC attribute is the family's ModelSpec)
_FAMILIES = MappingProxyType({
    "qwen3": (("qwen3", "qwen3_moe"), "prism_mcore.models.qwen3.family"),
    "qwen3_vl": (("qwen3_vl", "qwen3_vl_moe"), "prism_mcore.models.qwen3_vl.family"),
})


@dataclass(frozen=True)
class ExtraMemory:
    """What the first pipeline stage holds beyond the language model (a vision tower), per rank."""

    params: int = 0  # replicated on every TP rank of the first stage
    trainable: int = 0  # of which get gradients and optimizer state
    activation_elements: float = 0.0  # kept for the backward pass, per micro-batch
    notes: tuple[str, ...] = field(default=())


class ModelSpec:
    """The interface a family implements (see the module docstring). Methods a family does not need keep
    these defaults."""

    name: str = ""
    hf_model_types: tuple[str, ...] = ()
    expert_layouts: tuple[str, ...] = ("default",)  # on-disk MoE expert layouts the adapter reads

    # ---- config ---------------------------------------------------------------------------------
    def model_fields(self, hf: dict) -> dict:
        raise NotImplementedError

    def matches(self, model) -> bool:
        raise NotImplementedError

    def arch(self, model):
        raise NotImplementedError

    def text_config(self, arch):
        """The language model's ModelConfig (the whole model for text families)."""
        return arch

    def hf_config(self, arch) -> dict:
        raise NotImplementedError

    def as_sequence_classifier(self, cfg: dict) -> None:
        """Edit an exported config.json in place so it describes the discriminator (backbone + `score`)."""
        raise NotImplementedError

    def is_discriminator_config(self, hf: dict) -> bool:
        """Whether a config.json is an exported discriminator (as `as_sequence_classifier` marks it)."""
        raise NotImplementedError

    # ---- build and forward ------------------------------------------------------------------------
    def build(self, arch, parallel, discriminator: bool = False):
        raise NotImplementedError

    def forward_inputs(self, arch, tokens, attention_mask=None, position_ids=None, packed_seq_lengths=None,
                       pixel_values=None, image_grid_thw=None) -> tuple[Any, dict]:
        raise NotImplementedError

    # ---- HF adapter -------------------------------------------------------------------------------
    def hf_shapes(self, arch, expert_layout: str | None = None) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def megatron_reader(self, arch, hf_get: Callable, expert_layout: str | None = None) -> Callable:
        raise NotImplementedError

    def hf_views(self, arch, key: str, layer: int | None, value, expert_layout: str | None = None
                 ) -> Iterator[tuple[str, Any, tuple[int, ...]]]:
        """(HF name, source, HF shape) for one Megatron tensor (or one layer of it), where
        `source.reshape(shape)` is the HF tensor: a caller that copies anyway (weight sync's buckets) can
        copy `source` straight into place instead of materializing a reshaped copy first."""
        raise NotImplementedError

    def hf_tensors(self, arch, key: str, layer: int | None, value, expert_layout: str | None = None
                   ) -> Iterator[tuple[str, Any]]:
        for name, source, shape in self.hf_views(arch, key, layer, value, expert_layout):
            yield name, source.reshape(shape)

    def is_layered(self, key: str) -> bool:
        raise NotImplementedError

    # ---- tokenizer, processor, engines ------------------------------------------------------------
    def tokenizer(self, hf_dir=None):
        raise NotImplementedError

    def processor(self, arch):
        return None

    def engine_kwargs(self, arch) -> dict:
        return {}

    def upcycle(self, dense_dir, out_dir, **kwargs):
        raise NotImplementedError(f"{self.name}: no sparse upcycling")

    # ---- memory (pure arithmetic) -------------------------------------------------------------------
    def param_counts(self, model, *, vocab_size: int | None = None, lm_head: bool = True, value_head: bool = False):
        raise NotImplementedError

    def layer_activation_elements(self, model, tp: int, sp: bool, etp: int, tokens: float) -> float:
        raise NotImplementedError

    def padded_vocab_size(self, vocab_size: int, tp: int) -> int:
        raise NotImplementedError

    def extra_memory(self, model, *, rows: int, seq: int) -> ExtraMemory:
        """What the first pipeline stage holds beyond the language model (e.g. a vision tower over one
        micro-batch of `rows` rows of `seq` tokens); nothing for text families."""
        return ExtraMemory()


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def get_spec(name: str) -> ModelSpec:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(_FAMILIES)})")
    return importlib.import_module(_FAMILIES[name][1]).SPEC


def spec_for_hf(hf: dict) -> ModelSpec:
    """The family of an HF config.json (by its model_type)."""
    model_type = hf.get("model_type")
    for name, (types, _) in _FAMILIES.items():
        if model_type in types:
            return get_spec(name)
    known = ", ".join(t for types, _ in _FAMILIES.values() for t in types)
    raise ValueError(f"model_type {model_type!r} is not supported (expected one of {known})")


def spec_for(model) -> ModelSpec:
    """The family of a ModelConfig."""
    for name in _FAMILIES:
        spec = get_spec(name)
        if spec.matches(model):
            return spec
    raise ValueError("no model family describes this model config")


def resolve(model) -> tuple[ModelSpec, Any]:
    """(spec, arch) of a ModelConfig."""
    spec = spec_for(model)
    return spec, spec.arch(model)


def attach(module, spec: ModelSpec, arch) -> None:
    """Remember on a built model which spec and architecture it was built from, so code that only holds
    the module (the policy's forward on a batch) can ask the spec what the forward takes."""
    object.__setattr__(module, "prism_spec", spec)
    object.__setattr__(module, "prism_arch", arch)


def spec_of(module) -> tuple[ModelSpec, Any]:
    """(spec, arch) a model was built from, looking through Megatron's DDP / Float16Module wrappers."""
    while not hasattr(module, "prism_spec") and hasattr(module, "module"):
        module = module.module
    if not hasattr(module, "prism_spec"):
        raise ValueError(f"{type(module).__name__} was not built through a model spec")
    return module.prism_spec, module.prism_arch
