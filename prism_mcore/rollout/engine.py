"""What the trainer needs from a rollout engine, independent of vLLM and of Ray.

An engine generates from token-id prompts, scores fixed sequences (for the post-sync probe), takes new
weights as a staged, versioned update, sleeps while a colocated trainer runs, and reports its health.
Weight updates are two-phase on purpose: buckets are staged under a version and only `commit_update`
makes them live, so a sync that dies halfway leaves the engine serving the previous version.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch


class EngineError(RuntimeError):
    """An engine refused or failed a request; the message names the engine (and the step when known)."""


class StaleWeightsError(EngineError):
    """A generate call asked for a weight version the engine does not hold."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    @classmethod
    def from_config(cls, rollout, **overrides: Any) -> "SamplingParams":
        """From a `RolloutConfig` (n, temperature, top_p, max_tokens), with per-call overrides."""
        base = dict(n=rollout.n, temperature=rollout.temperature, top_p=rollout.top_p, max_tokens=rollout.max_tokens)
        return cls(**{**base, **overrides})


@dataclass
class Prompt:
    token_ids: list[int]
    # For multimodal models later: passed to the engine unchanged (vLLM's multi_modal_data, e.g. {"image": [...]}).
    multi_modal_data: dict[str, Any] | None = None


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the engine's raw (unprocessed) distribution
    finish_reason: str  # "stop" (EOS, stop token or string) or "length"


@dataclass
class GenerationResult:
    """The n completions of one prompt, with where and under which weights they were sampled."""
    completions: list[Completion]
    engine_id: int
    weight_version: int


@dataclass
class TensorEntry:
    """Where one HF-named tensor sits inside a bucket's byte buffer."""
    name: str
    dtype: str  # torch dtype name without the "torch." prefix
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        for s in self.shape:
            n *= s
        return n


@dataclass
class EngineHealth:
    engine_id: int
    ok: bool
    weight_version: int
    sleeping: bool
    pid: int
    staged_version: int | None = None  # an update being received but not yet committed
    busy: bool = False  # inside generate/score
    detail: str = ""


@dataclass
class UpdateSummary:
    version: int
    tensors: int
    bytes: int
    apply_s: float
    extra: dict[str, Any] = field(default_factory=dict)


class StagedUpdate:
    """The receiving half of a versioned update, shared by every engine: buckets are validated against
    the model's HF schema as they arrive (name known, shape equal, no duplicates) and kept until a commit
    that proves the update complete. Nothing here touches the live weights."""

    def __init__(self, engine_id: int, schema: dict[str, tuple[tuple[int, ...], str]]):
        self.engine_id, self.schema = engine_id, schema
        self.version: int | None = None
        self.buckets: list = []
        self.names: set[str] = set()

    def receive(self, version: int, live_version: int, bucket: Any) -> int:
        fetch = getattr(bucket, "fetch", None)
        if fetch is not None:
            # A collective transport (torch_distributed): take part in the sender's broadcast before any
            # check, so a rejected bucket never leaves the sender and the other engines waiting.
            try:
                fetch()
            except EngineError as e:
                raise EngineError(f"engine {self.engine_id}: {e}") from None
        if version <= live_version:
            raise EngineError(f"engine {self.engine_id}: update to version {version} is not newer than the "
                              f"live version {live_version}")
        if self.version != version:
            self.clear()
            self.version = version
        try:
            for e in bucket.entries():
                shape = self.schema.get(e.name, (None,))[0]
                if shape is None:
                    raise EngineError(f"engine {self.engine_id}: the model has no tensor named {e.name!r}")
                if tuple(e.shape) != shape:
                    raise EngineError(f"engine {self.engine_id}: {e.name} has shape {tuple(e.shape)}, the model "
                                      f"expects {shape}")
                if e.name in self.names:
                    raise EngineError(f"engine {self.engine_id}: {e.name} sent twice in version {version}")
                self.names.add(e.name)
        except EngineError:
            self.clear()
            raise
        self.buckets.append(bucket)
        return len(self.names)

    def take(self, version: int, expected_tensors: int, live_version: int) -> list:
        """The staged buckets of a complete `version` (staging is emptied either way)."""
        if self.version != version:
            staged = "nothing" if self.version is None else f"version {self.version}"
            raise EngineError(f"engine {self.engine_id}: commit of version {version}, but {staged} is staged")
        missing = set(self.schema) - self.names
        count = len(self.names)
        buckets = self.buckets
        self.buckets, self.version, self.names = [], None, set()
        if count != expected_tensors or missing:
            for b in buckets:
                b.release()
            raise EngineError(f"engine {self.engine_id}: version {version} incomplete: {count} of "
                              f"{expected_tensors} tensors staged, {len(missing)} model tensors missing "
                              f"(e.g. {sorted(missing)[:3]}); kept version {live_version}")
        return buckets

    def clear(self, version: int | None = None) -> None:
        if version is not None and self.version != version:
            return
        for b in self.buckets:
            b.release()
        self.buckets, self.version, self.names = [], None, set()


class RolloutEngine(abc.ABC):
    """One inference engine (its own tensor parallelism is its business)."""

    engine_id: int

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                 expect_version: int | None = None) -> list[GenerationResult]:
        """Completions per prompt, in order. With `expect_version`, refuse (StaleWeightsError) unless the live
        weights are exactly that version."""

    @abc.abstractmethod
    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t = 1..len-1 of every sequence (the probe's engine side)."""

    @abc.abstractmethod
    def receive_bucket(self, version: int, bucket: Any) -> int:
        """Stage one bucket of (HF name, tensor) pairs for `version`; returns the tensors staged so far.
        A bucket for a newer version than the one being staged discards the older, unfinished one."""

    @abc.abstractmethod
    def commit_update(self, version: int, expected_tensors: int, digest: bool = False) -> UpdateSummary:
        """Make the staged `version` live if exactly `expected_tensors` tensors were staged and they cover
        the whole model; otherwise discard the staging and keep the current version. With `digest`, the
        summary carries a hash of every tensor applied (to compare updates bit for bit)."""

    @abc.abstractmethod
    def abort_update(self, version: int | None = None) -> None:
        """Drop what was staged (for `version`, or whatever is staged)."""

    @abc.abstractmethod
    def sleep(self) -> bool:
        """Release what memory the platform lets us release while a colocated trainer runs; True when some
        was released (False: a no-op sleep, e.g. on a platform without sleep mode)."""

    @abc.abstractmethod
    def wake_up(self) -> None: ...

    @abc.abstractmethod
    def health(self) -> EngineHealth: ...

    @property
    @abc.abstractmethod
    def weight_version(self) -> int: ...
