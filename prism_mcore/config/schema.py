"""The one typed config schema, shared by the CLI, the YAML files in configs/ and the tests.

Field names of the model architecture follow Hugging Face's Qwen3 `config.json`, because that
is what users download and release; Megatron-specific knobs that we do not model are passed
straight through to `TransformerConfig` via `model.megatron` (slime-style, nothing re-invented).

Cross-field constraints live in `PrismConfig._check_layout` and raise `ValueError` with a
message that names the key and its constraint; `load.py` turns that into a one-line error.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    # allow_inf_nan=False: `optim.lr=inf` or `.nan` is a typo or a broken sweep, never a setting; pydantic's
    # gt/ge bounds alone let inf through (`optim.lr=inf` trained to NaN weights and exited 0).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info) -> Any:
        """Pydantic's lax mode reads true/false as 1/0 for int and float fields, so `trainer.steps=true`
        trained one step. A boolean is accepted only where the field's type admits bool (or Any)."""
        if isinstance(value, bool):
            import typing

            field = cls.model_fields.get(info.field_name)
            kinds = set(typing.get_args(field.annotation) or (field.annotation,)) if field else set()
            if not kinds & {bool, Any} and kinds & {int, float}:
                raise ValueError(f"must be {'an integer' if int in kinds else 'a number'}, not a boolean")
        return value


class ModelConfig(_Section):
    """A Qwen3 / Qwen3-MoE architecture, either read from `hf_path` or written inline."""

    hf_path: str | None = Field(None, description="HF checkpoint dir; its config.json overrides the fields below")
    vocab_size: int = Field(151936, gt=0)
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    head_dim: int = Field(16, gt=0)
    rope_theta: float = Field(1_000_000.0, gt=0)
    rms_norm_eps: float = Field(1e-6, gt=0)
    tie_word_embeddings: bool = True
    max_position_embeddings: int = Field(4096, gt=0)
    # Mixture of experts (Qwen3-MoE); num_experts == 0 means dense.
    num_experts: int = Field(0, ge=0)
    num_experts_per_tok: int = Field(2, gt=0)
    moe_intermediate_size: int | None = Field(None, gt=0)
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = Field(0.001, ge=0)
    moe_expert_backend: Literal["sequential", "grouped"] = Field(
        "sequential", description="MoE expert MLP: Megatron's SequentialMLP (one GEMM per expert) or our grouped "
        "GEMM over all local experts (prism_mcore/models/qwen3/grouped_experts.py); same weights and checkpoints")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    megatron: dict[str, Any] = Field(default_factory=dict, description="extra TransformerConfig kwargs")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


class ParallelConfig(_Section):
    tp: int = Field(1, ge=1, description="tensor parallel size")
    pp: int = Field(1, ge=1, description="pipeline parallel size")
    cp: int = Field(1, ge=1, description="context parallel size")
    ep: int = Field(1, ge=1, description="expert parallel size")
    dp: int | None = Field(None, ge=1, description="data parallel size; derived from world_size when unset")
    world_size: int | None = Field(None, ge=1, description="number of ranks; taken from the launcher when unset")
    sequence_parallel: bool = False
    num_microbatches: int = Field(1, ge=1)

    def resolved_dp(self, world_size: int | None = None) -> int:
        ws = world_size or self.world_size
        if self.dp is not None:
            return self.dp
        if ws is None:
            return 1
        return ws // (self.tp * self.pp * self.cp)


class OptimConfig(_Section):
    lr: float = Field(1e-6, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0, description="global grad-norm clip; 0 disables")
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    use_distributed_optimizer: bool = True


class DataConfig(_Section):
    train_files: list[str] = Field(default_factory=list)
    val_files: list[str] = Field(default_factory=list)
    max_prompt_length: int = Field(512, gt=0)
    max_response_length: int = Field(512, gt=0)
    micro_batch_tokens: int = Field(4096, gt=0, description="token budget of one micro-batch")
    global_batch_size: int = Field(4, gt=0, description="prompts (RL) or sequences (SFT) per step")
    seed: int = 0


class RolloutConfig(_Section):
    engine: Literal["vllm"] = "vllm"
    num_engines: int = Field(1, ge=1)
    engine_tp: int = Field(1, ge=1)
    mode: Literal["colocated", "disaggregated"] = "colocated"
    n: int = Field(4, ge=1, description="rollouts per prompt (group size)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, gt=0)
    weight_bucket_mb: int = Field(512, gt=0)
    timeout_s: float = Field(600.0, gt=0)
    transport: Literal["auto", "shm", "ray", "torch_distributed"] = Field(
        "auto", description="weight-sync transport: auto (shm when every engine is on the sender's node, else ray), "
                            "shm, ray (object store), torch_distributed (engines join a gloo/nccl group per sender)")
    zero_copy: bool = Field(False, description="send tensors that are views of the trainer's parameters as references "
                                               "into shared memory (same node; shm transport)")
    probe_every: int = Field(0, ge=0, description="run the post-sync log-prob probe on versions divisible by N; 0 = off")
    max_staleness: int = Field(0, ge=0, description="0 = strictly on-policy; N > 0 = async mode, rollouts may come "
                                                    "from weights up to N versions older than the policy")

    @model_validator(mode="after")
    def _check_transport(self) -> "RolloutConfig":
        if self.zero_copy and self.transport not in ("auto", "shm"):
            raise ValueError(f"rollout.zero_copy=true needs rollout.transport=auto or shm (references cannot "
                             f"cross processes on other nodes), got rollout.transport={self.transport}")
        return self


class AlgorithmConfig(_Section):
    name: Literal["grpo", "dapo", "gspo", "prism"] = "grpo"
    clip_ratio_low: float = Field(0.2, ge=0)
    clip_ratio_high: float = Field(0.2, ge=0)
    clip_ratio_c: float | None = Field(3.0, gt=1, description="dual-clip bound for negative advantages; null disables")
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    # PRISM alignment (spec section 3): A = a * A_perception + (1 - a) * A_reasoning - format_penalty * (1 - F)
    caption_weight: float = Field(0.5, ge=0, le=1, description="alpha: weight of the perception advantage")
    format_penalty: float = Field(1.5, ge=0, description="lambda_fmt, subtracted from malformed rollouts")
    gate_by_format: bool = Field(False, description="multiply the alignment term by F (the paper's docstring form)")
    score_clip: float = Field(10.0, gt=0, description="discriminator scores are clipped to +-score_clip")
    score_clip_mode: Literal["hard", "tanh", "none"] = "hard"
    score_reg_coef: float = Field(1e-3, ge=0, description="weight of the mean squared score in the D loss")
    # DAPO (spec section 4.3); None = on for algorithm.name=dapo, off otherwise
    dynamic_sampling: bool | None = Field(None, description="keep only prompt groups whose accuracy varies")
    gen_batch_size: int | None = Field(None, gt=0, description="prompts per generation batch; default 3x the "
                                       "global batch with dynamic sampling (the original's 96 for 32)")
    max_gen_batches: int = Field(10, ge=0, description="generation batches per step before training on what "
                                 "was kept (0 = unlimited)")
    overlong_buffer: int | None = Field(None, ge=0, description="tokens before rollout.max_tokens where the "
                                        "overlong penalty starts; None = max_tokens/2 for dapo, 0 = off")
    overlong_penalty_factor: float = Field(1.0, ge=0)

    def dynamic_sampling_on(self) -> bool:
        return self.name == "dapo" if self.dynamic_sampling is None else self.dynamic_sampling

    def overlong_buffer_tokens(self, max_tokens: int) -> int:
        if self.overlong_buffer is None:
            return max_tokens // 2 if self.name == "dapo" else 0
        return self.overlong_buffer


class TrainerConfig(_Section):
    stage: Literal["demo", "sft", "disc-warmup", "align", "rl"] = "demo"
    steps: int = Field(10, ge=1)
    seed: int = 1234
    output_dir: str = "outputs/run"
    save_interval: int = Field(0, ge=0, description="checkpoint every N steps; 0 disables")
    keep_checkpoints: int = Field(0, ge=0, description="after each save keep only the N newest checkpoints "
                                  "(each holds the optimizer state: ~16 bytes per parameter); 0 keeps all")
    log_interval: int = Field(1, ge=1)
    export_hf: bool = Field(True, description="write the trained model as an HF checkpoint to OUTPUT_DIR/hf")
    eval_interval: int = Field(0, ge=0, description="greedy accuracy/format on data.val_files every N steps, "
                               "at the start and at the end (rollout stages); 0 = only start and end")
    eval_max_prompts: int = Field(64, gt=0, description="held-out prompts per evaluation")
    eval_at_start: bool = Field(True, description="evaluate the starting weights before the first step")


class DiscriminatorConfig(_Section):
    """The align stage's second Megatron model: an upcycled MoE discriminator with its own model, layout
    and optimizer. Both models live on the same ranks, so tensor / pipeline / context parallel sizes
    must match the policy's; expert parallelism and sequence parallelism are its own."""

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(num_experts=4, num_experts_per_tok=2))
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    head_dropout: float = Field(0.1, ge=0, lt=1)
    aux_loss_coef: float = Field(0.0, ge=0, description="MoE load-balancing loss weight during align (the "
                                 "original uses none in this stage; warm-up uses model.router_aux_loss_coef)")


class PrismConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    discriminator: DiscriminatorConfig | None = Field(None, description="align stage only")

    @model_validator(mode="after")
    def _check_layout(self) -> "PrismConfig":
        for problem in layout_problems(self):
            raise ValueError(problem)
        return self


def layout_problems(cfg: PrismConfig, world_size: int | None = None) -> list[str]:
    """Every violated cross-field constraint, each phrased as `key=value constraint`.

    `world_size` is the launcher's actual rank count, checked again at start-up."""
    m, p = cfg.model, cfg.parallel
    out: list[str] = []
    if m.num_attention_heads % m.num_key_value_heads:
        out.append(f"model.num_key_value_heads={m.num_key_value_heads} must divide "
                   f"model.num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % p.tp:
        out.append(f"parallel.tp={p.tp} must divide model.num_attention_heads={m.num_attention_heads}")
    if m.num_key_value_heads % p.tp:
        out.append(f"parallel.tp={p.tp} must divide model.num_key_value_heads={m.num_key_value_heads} "
                   f"(KV groups are split across tensor-parallel ranks)")
    if m.num_hidden_layers % p.pp:
        out.append(f"parallel.pp={p.pp} must divide model.num_hidden_layers={m.num_hidden_layers}")
    if p.sequence_parallel and p.tp == 1:
        out.append("parallel.sequence_parallel=true needs parallel.tp > 1")
    if m.is_moe:
        if m.num_experts % p.ep:
            out.append(f"parallel.ep={p.ep} must divide model.num_experts={m.num_experts}")
        if m.num_experts_per_tok > m.num_experts:
            out.append(f"model.num_experts_per_tok={m.num_experts_per_tok} must be <= "
                       f"model.num_experts={m.num_experts}")
        if p.tp > 1 and not p.sequence_parallel:
            out.append(f"parallel.sequence_parallel must be true for an MoE model with parallel.tp={p.tp} "
                       f"(Megatron requires it)")
    elif p.ep > 1:
        out.append(f"parallel.ep={p.ep} needs an MoE model (model.num_experts > 0)")
    ws = world_size or p.world_size
    if ws is not None:
        dp = p.resolved_dp(ws)
        if p.tp * p.pp * p.cp * dp != ws:
            out.append(f"parallel.world_size={ws} must equal tp*pp*cp*dp="
                       f"{p.tp}*{p.pp}*{p.cp}*{dp}={p.tp * p.pp * p.cp * dp}")
        elif (p.cp * dp) % p.ep:
            out.append(f"parallel.ep={p.ep} must divide cp*dp={p.cp * dp} (experts are tensor-parallel like "
                       f"the dense layers and spread over the data-parallel ranks; world_size >= tp*pp*ep)")
    if m.vocab_size <= 0:
        out.append("model.vocab_size must be positive")
    if cfg.trainer.stage == "align":
        out += _discriminator_problems(cfg, ws)
    return out


def _discriminator_problems(cfg: PrismConfig, world_size: int | None) -> list[str]:
    d = cfg.discriminator
    if d is None:
        return ["discriminator: the align stage needs a discriminator section (model, parallel, optim)"]
    out = []
    for key in ("tp", "pp", "cp"):
        if getattr(d.parallel, key) != getattr(cfg.parallel, key):
            out.append(f"discriminator.parallel.{key}={getattr(d.parallel, key)} must equal parallel.{key}="
                       f"{getattr(cfg.parallel, key)} (both models share the ranks' tensor/pipeline/context groups)")
    if cfg.model.is_moe and d.model.is_moe and d.parallel.ep != cfg.parallel.ep:
        out.append(f"discriminator.parallel.ep={d.parallel.ep} must equal parallel.ep={cfg.parallel.ep} "
                   f"when both models are MoE (one set of expert groups)")
    if d.model.vocab_size != cfg.model.vocab_size and d.model.hf_path is None:
        out.append(f"discriminator.model.vocab_size={d.model.vocab_size} must equal model.vocab_size="
                   f"{cfg.model.vocab_size} (both read the policy's token ids)")
    probe = PrismConfig.model_construct(model=d.model, parallel=d.parallel.model_copy(
        update={"world_size": d.parallel.world_size or world_size or cfg.parallel.world_size}),
        trainer=TrainerConfig.model_construct(stage="disc-warmup"))
    out += [f"discriminator.{p}" for p in layout_problems(probe, world_size)]
    return out
