"""Per-GPU memory estimate of a training stage for its parallel layout (`prism validate` prints it).

Everything here is arithmetic on the config; nothing is allocated. The formulas, their assumptions and
the estimates of configs/cluster/*.yaml are written up in docs/memory.md. In short, for the worst
pipeline stage (the first one holds the most micro-batches in flight under 1F1B):

* weights: the local shard of every parameter, in `model.dtype`. Embedding and LM head rows are
  Megatron's padded vocabulary (a multiple of 128 * tp) split over tp; attention and dense MLP over tp;
  norms replicated; experts over ep (E / ep local experts) and expert-tensor-parallel (etp, Megatron's
  default is tp); the router replicated. With tied embeddings and pp > 1 the last stage holds a copy.
* gradients: Megatron DDP keeps one contiguous `main_grad` buffer per rank for all local parameters,
  fp32 because `wrap_ddp` reduces in fp32 (grad_reduce_in_fp32=True): 4 bytes per local parameter,
  not sharded (the distributed optimizer reduce-scatters into it).
* optimizer: Adam m and v (fp32) plus an fp32 master copy for 16-bit parameters: 12 bytes per parameter
  (8 for fp32 parameters, which are their own master), divided by the data-parallel group size when
  `optim.use_distributed_optimizer` (dense parameters: dp * cp ranks; expert parameters: the
  expert-data-parallel group, world / (pp * etp * ep) ranks).
* activations: what autograd keeps per micro-batch, counted tensor by tensor for the Qwen3 layer
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  adapted to GQA, SwiGLU, RMSNorm + q/k-norm, no dropout and flash/fused attention), see
  models/qwen3/memory.py `layer_activation_elements`; times the micro-batches in flight; recomputation from
  `model.megatron.recompute_granularity / recompute_method / recompute_num_layers`.
* a vision-language model's first stage also holds its vision tower (replicated over TP), with gradients
  and optimizer state only for the vision parameters that train, and its activations over the micro-batch's
  image tokens (one image per row at `model.vision.max_pixels`); the family's spec gives the counts.
* the align stage adds the discriminator (same ranks) with its own layout and optimizer.
* colocated rollout: vLLM sleeps (level 1: weights to CPU, KV cache dropped) while the trainer runs,
  so it adds nothing to the training peak; while it generates, the trainer's weights, gradients and
  optimizer state stay resident next to the engine's weights; vLLM's KV cache takes what is left.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from prism_mcore.config.schema import ModelConfig, ParallelConfig, PrismConfig

GiB = 1024 ** 3
DEFAULT_GPU_MEMORY_GIB = 80.0
# prism_mcore/ops/logprob.py _CHUNKS[("cuda", "cuda")]: the fused log-prob head's fp32 tile on GPUs
LOGPROB_CHUNK_TOKENS, LOGPROB_CHUNK_VOCAB = 16384, 4096
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ----------------------------------------------------------------------------------------------
# Parameter counts: the model family's (models/spec.py), exact against transformers' classes
# ----------------------------------------------------------------------------------------------

def _spec(m: ModelConfig):
    from prism_mcore.models.spec import spec_for

    return spec_for(m)


def param_counts(m: ModelConfig, *, vocab_size: int | None = None, lm_head: bool = True, value_head: bool = False):
    """The family's parameter counts (`ParamCounts`: embedding, per-layer parts, head, `extra` = e.g. the
    vision tower). `vocab_size` overrides the rows (Megatron's padded vocabulary); `lm_head=False` drops
    the untied head (the discriminator replaces it with a [1, hidden] `value_head`)."""
    return _spec(m).param_counts(m, vocab_size=vocab_size, lm_head=lm_head, value_head=value_head)


def padded_vocab(m: ModelConfig, tp: int) -> int:
    return _spec(m).padded_vocab_size(m.vocab_size, tp)


def layer_activation_elements(m: ModelConfig, tp: int, sp: bool, etp: int, tokens: float) -> float:
    """Elements autograd keeps for one decoder layer over `tokens` tokens (the family's count, see e.g.
    models/qwen3/memory.py)."""
    return _spec(m).layer_activation_elements(m, tp, sp, etp, tokens)


# ----------------------------------------------------------------------------------------------
# One model on one rank
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelMemory:
    """Bytes on one rank of the worst pipeline stage for one model (policy or discriminator)."""

    name: str
    weights: int
    grads: int
    optimizer: int
    activations: int
    local_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.static + self.activations


@dataclass
class MemoryEstimate:
    world_size: int
    models: list[ModelMemory]
    rollout_weights: int = 0  # colocated engine's weight shard (generation phase only)
    gpu_bytes: int = int(DEFAULT_GPU_MEMORY_GIB * GiB)

    @property
    def training_peak(self) -> int:
        return sum(m.total for m in self.models)

    @property
    def generation_peak(self) -> int:
        """Colocated generation: trainer state stays resident next to the engine weights (KV cache excluded)."""
        return sum(m.static for m in self.models) + self.rollout_weights if self.rollout_weights else 0

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.generation_peak)

    def fits(self, gpu_gib: float = DEFAULT_GPU_MEMORY_GIB) -> bool:
        return self.peak <= gpu_gib * GiB

    def table(self, gpu_gib: float | None = DEFAULT_GPU_MEMORY_GIB) -> str:
        """The estimate, and with `gpu_gib` the budget it is measured against (None: no budget line, for a
        config that runs on CPU, where a GPU's size means nothing)."""
        g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
        lines = [f"per-GPU memory estimate (GiB; worst pipeline stage, {self.world_size} ranks):",
                 f"  {'component':<13}" + "".join(f"{m.name:>15}" for m in self.models)]
        for key in ("weights", "grads", "optimizer", "activations", "total"):
            label = {"grads": "gradients"}.get(key, key)
            lines.append(f"  {label:<13}" + "".join(f"{g(getattr(m, key)):>15}" for m in self.models))
        budget = "" if gpu_gib is None else \
            f" of {gpu_gib:g} GiB ({100 * self.training_peak / (gpu_gib * GiB):.0f}%)"
        lines.append(f"  training peak {g(self.training_peak)}{budget or ' GiB'}")
        if self.rollout_weights:
            left = "" if gpu_gib is None else \
                f", {g(max(0, gpu_gib * GiB - self.generation_peak))} GiB left for KV cache"
            lines.append(f"  rollout (colocated; vLLM sleeps while training): engine weights {g(self.rollout_weights)}"
                         f" + trainer state {g(self.generation_peak - self.rollout_weights)} while generating{left}")
        for m in self.models:
            lines += [f"  note ({m.name}): {n}" for n in m.notes]
        return "\n".join(lines)


def _megatron(m: ModelConfig, key: str, default):
    value = m.megatron.get(key, default)
    return default if value is None else value


def layer_activation_elements(m: ModelConfig, tp: int, sp: bool, etp: int, tokens: int) -> float:
    """Elements autograd keeps for one transformer layer over `tokens` tokens of one rank's micro-batch
    (before the CP split; attention scores excluded, see `attention_score_elements`).

    Per token, h = hidden, q = heads * head_dim, kv = kv_heads * head_dim, I = intermediate:
      attention: RMSNorm input h, QKV input h, q/k-norm inputs q + kv, flash-attention q, k, v (q + 2 kv),
                 its output (the projection's input) q                       -> 2h + 3q + 3kv
      dense MLP: RMSNorm input h, fc1 input h, SwiGLU input 2I, fc2 input I  -> 2h + 3I
    Korthikanti et al.'s 34 s b h for GPT (q = kv = h, I = 4h, GeLU, 2 dropout masks) is the same count.
    Under TP the q/kv/I terms split over tp; the four h terms split only with sequence parallelism.
    MoE MLP (alltoall dispatcher, balanced routing): RMSNorm input h and the fp32 router input (2h in
    16-bit elements) per SP-local token; k copies of each token leave the dispatcher (h each), and each
    expert rank, gathering its TP group's tokens, keeps fc1 input h, SwiGLU input 2I/etp, fc2 input
    I/etp and the expert output h (for the probability-weighted unpermute) per copy.
    """
    h, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    sp_tokens = tokens / tp if sp else tokens
    attention = sp_tokens * 2 * h + tokens * 3 * (q + kv) / tp
    if m.is_moe:
        inter, k = m.moe_intermediate_size or m.intermediate_size, m.num_experts_per_tok
        mlp = sp_tokens * (h + 2 * h + k * h) + tokens * k * (2 * h + 3 * inter / etp)
    else:
        mlp = sp_tokens * 2 * h + tokens * 3 * m.intermediate_size / tp
    return attention + mlp


def attention_score_elements(m: ModelConfig, tp: int, rows: int, seq: int) -> int:
    """Unfused attention (the discriminator's arbitrary mask, see below) keeps its softmax output,
    [rows, heads / tp, seq, seq], per layer."""
    return rows * (m.num_attention_heads // tp) * seq * seq


def model_memory(name: str, m: ModelConfig, p: ParallelConfig, use_distributed_optimizer: bool, world: int, *,
                 tokens: int, rows: int, seq: int, head: str, unfused_attention: bool = False) -> ModelMemory:
    """One model's bytes on the worst pipeline stage. `tokens` per micro-batch of one DP rank (padded
    rows x seq), `head` is "logprob" (policy: fused log-prob head) or "value" (discriminator)."""
    e = _BYTES[m.dtype]
    tp, pp, cp, ep = p.tp, p.pp, p.cp, p.ep
    etp = int(_megatron(m, "expert_tensor_parallel_size", tp)) if m.is_moe else 1
    dp = p.resolved_dp(world)
    expert_dp = max(1, world // (pp * etp * ep))
    vocab = padded_vocab(m, tp)
    counts = param_counts(m, vocab_size=vocab, lm_head=head == "logprob", value_head=head == "value")
    extra = _spec(m).extra_memory(m, rows=rows, seq=seq)  # e.g. a vision tower, on the first stage
    layers = m.num_hidden_layers // pp
    dense_layer = (counts.attention - 2 * counts.head_dim) / tp + 2 * counts.head_dim + counts.norms + (
        counts.mlp if m.is_moe else counts.mlp / tp)
    expert_layer = counts.experts / ep / etp

    stages = []
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        dense = layers * dense_layer
        if first:
            dense += counts.embedding / tp
        if last:
            dense += counts.final_norm + counts.value_head
            if head == "logprob":
                dense += (counts.lm_head or (counts.embedding if not first else 0)) / tp
        stages.append((stage, dense, layers * expert_layer))

    opt_bytes = 12 if e == 2 else 8

    def static(dense: float, expert: float) -> tuple[int, int, int]:
        weights = (dense + expert) * e
        grads = (dense + expert) * 4
        if use_distributed_optimizer:
            optimizer = dense * opt_bytes / (dp * cp) + expert * opt_bytes / expert_dp
        else:
            optimizer = (dense + expert) * opt_bytes
        return int(weights), int(grads), int(optimizer)

    # activations (per micro-batch, one rank)
    notes = []
    local_tokens = tokens / cp
    layer_act = layer_activation_elements(m, tp, p.sequence_parallel, etp, local_tokens) * e
    layer_input = (local_tokens / tp if p.sequence_parallel else local_tokens) * m.hidden_size * e
    scores = attention_score_elements(m, tp, rows, seq) * e if unfused_attention else 0
    granularity = _megatron(m, "recompute_granularity", None)
    method = _megatron(m, "recompute_method", "uniform")
    n = int(_megatron(m, "recompute_num_layers", 1))
    modules = _megatron(m, "recompute_modules", ["core_attn"])
    transient = 0
    if granularity == "full":
        if method == "block":
            n = min(n, layers)
            stored = n * layer_input + (layers - n) * (layer_act + scores)
        else:
            n = max(1, min(n, layers))
            stored = math.ceil(layers / n) * layer_input
        transient = n * (layer_act + scores)  # the chunk being recomputed in the backward
        notes.append(f"full recompute ({method}, {n} layer(s)): layer inputs kept, one chunk live in backward")
    elif granularity == "selective" and "core_attn" in modules:
        stored = layers * layer_act
        transient = scores
        if scores:
            notes.append("selective recompute of core attention: scores of one layer live at a time")
    else:
        stored = layers * (layer_act + scores)
    if unfused_attention:
        notes.append(f"unfused attention (arbitrary mask): {rows} x {m.num_attention_heads // tp} heads x {seq}^2 "
                     f"scores = {scores / GiB:.2f} GiB per layer")
        stored += rows * seq * seq  # the boolean [rows, 1, seq, seq] mask, shared by the layers
    inflight = pp  # 1F1B: the first stage holds pp micro-batches (assumes >= pp micro-batches per step)

    # head on the last stage (pp == 1: the same, worst, stage); it runs once per micro-batch at a time
    gathered = local_tokens * m.hidden_size
    if head == "logprob":
        # fused log-prob: the gathered final hidden (saved) + its d(hidden), one fp32 tile, and the
        # d(weight) buffer of the local vocab shard, in the weight dtype; never [tokens, vocab] logits
        head_bytes = 2 * gathered * e + LOGPROB_CHUNK_TOKENS * LOGPROB_CHUNK_VOCAB * 4 + vocab // tp * m.hidden_size * e
    else:
        # value head: fp32 copy of the gathered hidden, its dropout output and mask
        head_bytes = gathered * (4 + 4 + 1)

    notes += list(extra.notes)
    results = []
    for stage, dense, expert in stages:
        w, g, o = static(dense, expert)
        act_factor = max(1, inflight - stage)
        act = act_factor * stored + transient + (head_bytes if stage == pp - 1 else 0)
        local = dense + expert
        if stage == 0 and extra.params:
            # replicated over TP; only its trainable part has gradients and optimizer state (frozen parameters
            # stay out of DDP's buffers and the optimizer); its activations are not recomputed
            _, extra_o, _ = static(extra.trainable, 0)
            w, g, o = w + extra.params * e, g + extra.trainable * 4, o + extra_o
            act += act_factor * extra.activation_elements * e
            local += extra.params
        results.append(ModelMemory(name, w, g, o, int(act), int(local), notes))
    return max(results, key=lambda r: r.total)


# ----------------------------------------------------------------------------------------------
# A stage's config
# ----------------------------------------------------------------------------------------------

def _policy_micro(cfg: PrismConfig) -> tuple[int, int, int]:
    """(tokens, rows, seq) of one policy micro-batch on one DP rank, as the trainers batch them."""
    d = cfg.data
    seq = d.max_prompt_length + d.max_response_length
    if cfg.trainer.stage == "sft":
        # sft.py packs whole samples up to the budget; one sample may exceed it on its own
        tokens = max(d.micro_batch_tokens, seq)
        return tokens, max(1, tokens // seq), seq
    rows = max(1, d.micro_batch_tokens // seq)  # policy_update.py: rows of the padded full length
    return rows * seq, rows, seq


def _warmup_micro(cfg: PrismConfig) -> tuple[int, int, int]:
    seq = cfg.data.max_prompt_length + cfg.data.max_response_length
    rows = 2 * max(1, cfg.data.micro_batch_tokens // (2 * seq))  # disc_warmup.py: whole pairs
    return rows * seq, rows, seq


def _align_disc_micro(cfg: PrismConfig) -> tuple[int, int, int]:
    """disc_update.pieces_of: k rollouts of one prompt group (2k rows: their captions and reasonings) plus
    the teacher's two rows, padded to the longest row, as many rollouts as fit the budget, at least one."""
    seq = cfg.data.max_prompt_length + cfg.data.max_response_length
    per_rollout = max(1, min(cfg.rollout.n, (cfg.data.micro_batch_tokens // seq - 2) // 2))
    rows = 2 * per_rollout + 2
    return rows * seq, rows, seq


def _rollout_weights(cfg: PrismConfig) -> int:
    r = cfg.rollout
    if cfg.trainer.stage not in ("align", "rl") or r.mode != "colocated":
        return 0
    return int(param_counts(cfg.model).total * _BYTES[r.engine_dtype(cfg.model.dtype)] / r.engine_tp)  # tower included


def estimate_memory(cfg: PrismConfig, world_size: int | None = None,
                    gpu_gib: float = DEFAULT_GPU_MEMORY_GIB) -> MemoryEstimate:
    """Per-GPU bytes of `cfg`'s training stage on `world_size` ranks (default: parallel.world_size,
    else tp * pp * cp * ep, the smallest world the layout needs)."""
    p = cfg.parallel
    world = world_size or p.world_size or p.tp * p.pp * p.cp * (p.dp or max(1, p.ep))
    stage = cfg.trainer.stage
    models = []
    if stage == "disc-warmup":
        tokens, rows, seq = _warmup_micro(cfg)
        models.append(model_memory("discriminator", cfg.model, p, cfg.optim.use_distributed_optimizer, world,
                                   tokens=tokens, rows=rows, seq=seq, head="value", unfused_attention=True))
    else:
        tokens, rows, seq = _policy_micro(cfg)
        models.append(model_memory("policy", cfg.model, p, cfg.optim.use_distributed_optimizer, world,
                                   tokens=tokens, rows=rows, seq=seq, head="logprob"))
    if stage == "align" and cfg.discriminator is not None:
        d = cfg.discriminator
        tokens, rows, seq = _align_disc_micro(cfg)
        disc = model_memory("discriminator", d.model, d.parallel, d.optim.use_distributed_optimizer, world,
                            tokens=tokens, rows=rows, seq=seq, head="value", unfused_attention=True)
        if tokens > cfg.data.micro_batch_tokens:
            disc.notes.append(f"the smallest micro-batch is one rollout with its teacher: {rows} rows x {seq} tokens "
                              f"= {tokens} > data.micro_batch_tokens={cfg.data.micro_batch_tokens}")
        models.append(disc)
    return MemoryEstimate(world, models, _rollout_weights(cfg), int(gpu_gib * GiB))
