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
from pydantic_core import PydanticUndefined


def live(default: Any = PydanticUndefined, read_by: str = "", *, default_factory=None, **constraints):
    """A config field and the module (a path under prism_mcore/) whose code reads it. The name is the field's
    documentation of where it takes effect, and tests/test_config_liveness.py checks that module reads the field:
    a setting either changes what runs or does not exist."""
    extra = {"read_by": read_by}
    if default_factory is not None:
        return Field(default_factory=default_factory, json_schema_extra=extra, **constraints)
    return Field(default, json_schema_extra=extra, **constraints)


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


class VisionConfig(_Section):
    """The vision tower of a Qwen3-VL(-MoE) model and how it trains. Filled from `model.hf_path` (a Qwen3-VL
    checkpoint's `vision_config` and token ids); a `model.vision` section makes the model a Qwen3-VL."""

    train: Literal["frozen", "merger", "full"] = live(
        "full", "models/qwen3_vl/family.py", description="which vision parameters train: none (frozen), the patch "
        "merger and deepstack mergers (merger), or the whole tower (full)")
    lr_mult: float = live(1.0, "models/qwen3_vl/family.py", gt=0, description="learning-rate multiplier of the "
                          "vision parameters that train (a separate optimizer param group)")
    max_pixels: int = live(313600, "models/qwen3_vl/family.py", gt=0, description="images are resized to at most "
                           "this many pixels (PRISM: 560^2); one LLM token per (patch x merge)^2 pixels")
    tower: dict[str, Any] = live(default_factory=dict, read_by="models/qwen3_vl/config.py", description="the HF "
                                 "vision_config (depth, hidden_size, num_heads, patch_size, ...)")
    mrope_section: list[int] = live(default_factory=lambda: [24, 20, 20], read_by="models/qwen3_vl/config.py",
                                    description="interleaved MRoPE frequencies per axis (t, h, w); sum = head_dim/2")
    image_token_id: int = live(151655, "models/qwen3_vl/config.py", ge=0)
    video_token_id: int = live(151656, "models/qwen3_vl/config.py", ge=0)
    vision_start_token_id: int = live(151652, "models/qwen3_vl/config.py", ge=0)
    vision_end_token_id: int = live(151653, "models/qwen3_vl/config.py", ge=0)


class ModelConfig(_Section):
    """A Qwen3 / Qwen3-MoE architecture, either read from `hf_path` or written inline."""

    hf_path: str | None = live(None, "trainer/run.py", description="HF checkpoint dir; its config.json overrides "
                               "the fields below")
    vocab_size: int = live(151936, "models/qwen3/model.py", gt=0)
    hidden_size: int = live(64, "models/qwen3/model.py", gt=0)
    intermediate_size: int = live(128, "models/qwen3/model.py", gt=0)
    num_hidden_layers: int = live(2, "models/qwen3/model.py", gt=0)
    num_attention_heads: int = live(4, "models/qwen3/model.py", gt=0)
    num_key_value_heads: int = live(2, "models/qwen3/model.py", gt=0)
    head_dim: int = live(16, "models/qwen3/model.py", gt=0)
    rope_theta: float = live(1_000_000.0, "models/qwen3/model.py", gt=0)
    rms_norm_eps: float = live(1e-6, "models/qwen3/model.py", gt=0)
    tie_word_embeddings: bool = live(True, "models/qwen3/model.py")
    max_position_embeddings: int = live(4096, "models/qwen3/model.py", gt=0)
    # Mixture of experts (Qwen3-MoE); num_experts == 0 means dense.
    num_experts: int = live(0, "models/qwen3/model.py", ge=0)
    num_experts_per_tok: int = live(2, "models/qwen3/model.py", gt=0)
    moe_intermediate_size: int | None = live(None, "models/qwen3/model.py", gt=0)
    norm_topk_prob: bool = live(True, "models/qwen3/model.py")
    router_aux_loss_coef: float = live(0.001, "models/qwen3/model.py", ge=0)
    moe_expert_backend: Literal["sequential", "grouped"] = live(
        "sequential", "models/qwen3/model.py", description="MoE expert MLP: Megatron's SequentialMLP (one GEMM per "
        "expert) or our grouped GEMM over all local experts (models/qwen3/grouped_experts.py); same weights and "
        "checkpoints")
    dtype: Literal["float32", "bfloat16", "float16"] = live("float32", "models/qwen3/model.py")
    megatron: dict[str, Any] = live(default_factory=dict, read_by="models/qwen3/model.py",
                                    description="extra TransformerConfig kwargs")
    vision: VisionConfig | None = Field(None, description="Qwen3-VL: the vision tower (set from a Qwen3-VL "
                                        "hf_path); null = a text model")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


class ParallelConfig(_Section):
    tp: int = live(1, "parallel/layout.py", ge=1, description="tensor parallel size")
    pp: int = live(1, "parallel/layout.py", ge=1, description="pipeline parallel size")
    cp: int = live(1, "parallel/layout.py", ge=1, description="context parallel size (refused above 1 until a "
                   "stage splits sequences)")
    ep: int = live(1, "parallel/layout.py", ge=1, description="expert parallel size")
    dp: int | None = live(None, "trainer/train.py", ge=1, description="data parallel size; derived from world_size "
                          "when unset")
    world_size: int | None = live(None, "trainer/train.py", ge=1, description="number of ranks; taken from the "
                                  "launcher when unset")
    sequence_parallel: bool = live(False, "models/qwen3/model.py")

    def resolved_dp(self, world_size: int | None = None) -> int:
        ws = world_size or self.world_size
        if self.dp is not None:
            return self.dp
        if ws is None:
            return 1
        return ws // (self.tp * self.pp * self.cp)


class OptimConfig(_Section):
    lr: float = live(1e-6, "trainer/step.py", gt=0)
    min_lr: float = live(0.0, "trainer/step.py", ge=0)
    weight_decay: float = live(0.01, "trainer/step.py", ge=0)
    adam_beta1: float = live(0.9, "trainer/step.py", ge=0, lt=1)
    adam_beta2: float = live(0.999, "trainer/step.py", ge=0, lt=1)
    adam_eps: float = live(1e-8, "trainer/step.py", gt=0)
    clip_grad: float = live(1.0, "trainer/step.py", ge=0, description="global grad-norm clip; 0 disables")
    schedule: Literal["constant", "cosine"] = live("constant", "trainer/step.py")
    warmup_steps: int = live(0, "trainer/step.py", ge=0)
    use_distributed_optimizer: bool = live(True, "trainer/step.py")


class DataConfig(_Section):
    train_files: list[str] = live(default_factory=list, read_by="trainer/train.py")
    val_files: list[str] = live(default_factory=list, read_by="trainer/engines.py")
    max_prompt_length: int = live(512, "data/rl_dataset.py", gt=0)
    max_response_length: int = live(512, "trainer/sft.py", gt=0)
    micro_batch_tokens: int = live(4096, "trainer/sft.py", gt=0, description="token budget of one micro-batch "
                                   "(rows x padded length)")
    global_batch_size: int = live(4, "trainer/sft.py", gt=0, description="prompts (RL) or sequences (SFT) per step")
    seed: int = live(0, "trainer/sft.py")


class RolloutConfig(_Section):
    num_engines: int = live(1, "rollout/engine_pool.py", ge=1)
    engine_tp: int = live(1, "rollout/engine_pool.py", ge=1)
    mode: Literal["colocated", "disaggregated"] = live("colocated", "rollout/engine_pool.py")
    n: int = live(4, "trainer/engines.py", ge=1, description="rollouts per prompt (group size)")
    temperature: float = live(1.0, "rollout/engine.py", ge=0)
    top_p: float = live(1.0, "rollout/engine.py", gt=0, le=1)
    max_tokens: int = live(256, "rollout/engine.py", gt=0)
    weight_bucket_mb: int = live(512, "rollout/weight_sync.py", gt=0)
    timeout_s: float = live(600.0, "rollout/weight_sync.py", gt=0)
    transport: Literal["auto", "shm", "ray", "torch_distributed"] = live(
        "auto", "rollout/weight_sync.py", description="weight-sync transport: auto (per engine: shm to the engines on "
        "the sender's node, torch_distributed to the others), shm, ray (object store), torch_distributed (engines join a "
        "gloo/nccl group per sender, across nodes)")
    zero_copy: bool = live(False, "rollout/weight_sync.py", description="send tensors that are views of the "
                           "trainer's parameters as references into shared memory (same node; shm transport)")
    probe_every: int = live(0, "trainer/engines.py", ge=0, description="after every N-th weight sync the engines "
                            "score a fixed probe batch and must match the trainer's log-probs (fails the run "
                            "otherwise); 0 = off")
    # Engine settings (vLLM). Lengths are checked against the stage's data.max_prompt_length + rollout.max_tokens
    # at load (`rollout_problems`): an engine that cannot hold a prompt and its response fails at start-up.
    max_model_len: int | None = live(None, "rollout/cluster.py", gt=0, description="engine context length; unset "
                                     "= data.max_prompt_length + rollout.max_tokens (set: at least that)")
    max_num_batched_tokens: int | None = live(
        None, "rollout/cluster.py", gt=0, description="tokens per engine step; unset = the context length (whole "
        "prefills); below it needs enable_chunked_prefill")
    enable_chunked_prefill: bool = live(False, "rollout/cluster.py", description="split long prefills over engine "
                                        "steps (GPU only: on CPU engines run whole prefills, see trainer/engines.py)")
    max_num_seqs: int = live(64, "rollout/cluster.py", gt=0, description="sequences an engine runs at once")
    dtype: Literal["model", "float32", "bfloat16", "float16"] = live(
        "model", "rollout/cluster.py", description="the engines' weights and compute; model = model.dtype. "
        "bfloat16 under a float32 trainer halves engine memory and speeds up generation (the engines cast each "
        "synced tensor as they load it; the log-prob probe's tolerance follows the coarser dtype)")
    gpu_memory_utilization: float | None = live(
        None, "rollout/cluster.py", gt=0, le=1, description="share of a GPU an engine may fill (weights + KV "
        "cache); unset = 0.5 colocated (the trainer shares the GPU), 0.85 disaggregated")
    enforce_eager: bool = live(True, "rollout/cluster.py", description="no CUDA graphs (faster start-up, slower "
                               "decoding; false on GPU clusters)")
    sleep_level: Literal[1, 2] = live(1, "rollout/engine_pool.py", description="colocated: how engines sleep while "
                                      "the trainer trains; 1 = weights to host memory, KV cache dropped; 2 = weights "
                                      "dropped too (every sync re-sends all of them anyway)")
    ray_address: str | None = live(None, "trainer/engines.py", description="Ray cluster the trainer joins: an "
                                   "address or 'auto'; unset = $RAY_ADDRESS when set, else a local Ray started for "
                                   "the run")

    def engine_dtype(self, model_dtype: str) -> str:
        """The engines' dtype: `dtype`, where "model" means the trainer's `model.dtype`."""
        return model_dtype if self.dtype == "model" else self.dtype

    @model_validator(mode="after")
    def _check_transport(self) -> "RolloutConfig":
        if self.zero_copy and self.transport not in ("auto", "shm"):
            raise ValueError(f"rollout.zero_copy=true needs rollout.transport=auto or shm (references cannot "
                             f"cross processes on other nodes), got rollout.transport={self.transport}")
        return self


class AlgorithmConfig(_Section):
    """Fields left unset take the preset of `name` (algorithms/presets.py), filled in at
    validation, so what `prism validate` shows is what runs."""

    name: Literal["grpo", "dapo", "gspo", "prism"] = live("grpo", "trainer/policy_update.py")
    clip_ratio_low: float = live(0.2, "trainer/policy_update.py", ge=0)
    clip_ratio_high: float = live(0.2, "trainer/policy_update.py", ge=0)
    clip_ratio_c: float | None = live(3.0, "trainer/policy_update.py", gt=1, description="dual-clip bound for "
                                      "negative advantages; null disables")
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = (
        live("token-mean", "trainer/policy_update.py"))
    ppo_mini_batch_size: int | None = live(
        None, "trainer/policy_update.py", gt=0, description="prompts per policy update (each with its rollout.n "
        "samples, as verl counts it); the step's batch is cut into global_batch_size / ppo_mini_batch_size "
        "updates; unset = one update on the whole batch (the paper's setting)")
    ppo_epochs: int = live(1, "trainer/policy_update.py", ge=1, description="passes over the step's mini-batches")
    tis_cap: float | None = live(None, "trainer/policy_update.py", gt=0, description="truncated importance "
                                 "sampling: weight each token's loss by min(pi_old / pi_rollout, tis_cap); unset = off")
    # PRISM alignment (spec section 3): A = a * A_perception + (1 - a) * A_reasoning - format_penalty * (1 - F)
    caption_weight: float = live(0.5, "trainer/align.py", ge=0, le=1, description="alpha: weight of the "
                                 "perception advantage")
    format_penalty: float = live(1.5, "trainer/align.py", ge=0, description="lambda_fmt, subtracted from "
                                 "malformed rollouts")
    gate_by_format: bool = live(False, "trainer/align.py", description="multiply the alignment term by F (the "
                                "paper's docstring form)")
    score_clip: float = live(10.0, "trainer/align.py", gt=0, description="discriminator scores are clipped to "
                             "+-score_clip")
    score_clip_mode: Literal["hard", "tanh", "none"] = live("hard", "trainer/align.py")
    score_reg_coef: float = live(1e-3, "trainer/disc_update.py", ge=0, description="weight of the mean squared "
                                 "score in the D loss")
    # DAPO (spec section 4.3); unset = the preset (on for dapo)
    dynamic_sampling: bool = live(False, "trainer/rl.py", description="keep only prompt groups whose accuracy "
                                  "varies")
    gen_batch_size: int | None = live(None, "trainer/rl.py", gt=0, description="prompts per generation batch; "
                                      "default 3x the global batch with dynamic sampling (the original's 96 for 32)")
    max_gen_batches: int = live(10, "trainer/rl.py", ge=0, description="generation batches per step before "
                                "training on what was kept (0 = unlimited)")
    overlong_buffer: int | None = live(None, "trainer/rl.py", ge=0, description="tokens before rollout.max_tokens "
                                       "where the overlong penalty starts; unset = max_tokens/2 for dapo, 0 = off")
    overlong_penalty_factor: float = live(1.0, "trainer/rl.py", ge=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        from prism_mcore.algorithms.presets import ALGORITHM_PRESETS

        name = data.get("name", "grpo")
        return {**ALGORITHM_PRESETS.get(name, {}), **{k: v for k, v in data.items()}}


class TrainerConfig(_Section):
    stage: Literal["demo", "sft", "disc-warmup", "align", "rl"] = live("demo", "trainer/train.py")
    steps: int = live(10, "trainer/run.py", ge=1)
    seed: int = live(1234, "trainer/engines.py")
    output_dir: str = live("outputs/run", "trainer/run.py")
    save_interval: int = live(0, "trainer/run.py", ge=0, description="checkpoint every N steps; 0 disables")
    keep_checkpoints: int = live(0, "trainer/run.py", ge=0, description="after each save keep only the N newest "
                                 "checkpoints (each holds the optimizer state: ~16 bytes per parameter); 0 keeps all")
    max_bad_steps: int = live(3, "trainer/run.py", ge=1, description="a step whose loss or gradient norm is not "
                              "finite applies no update; after this many in a row the run stops (exit 1) and its "
                              "last good checkpoint stays as it was")
    log_interval: int = live(1, "trainer/run.py", ge=1, description="write metrics (JSONL, TensorBoard) every N "
                             "steps and at the last step")
    export_hf: bool = live(True, "trainer/sft.py", description="write the trained model as an HF checkpoint to "
                           "OUTPUT_DIR/hf")
    eval_interval: int = live(0, "trainer/engines.py", ge=0, description="greedy accuracy/format on "
                              "data.val_files every N steps, at the start and at the end (rollout stages); 0 = only "
                              "start and end")
    eval_max_prompts: int = live(64, "trainer/engines.py", gt=0, description="held-out prompts per evaluation")
    eval_at_start: bool = live(True, "trainer/rl.py", description="evaluate the starting weights before the "
                               "first step")


class DiscriminatorConfig(_Section):
    """The align stage's second Megatron model: an upcycled MoE discriminator with its own model, layout
    and optimizer. Both models live on the same ranks, so tensor / pipeline / context parallel sizes
    must match the policy's; expert parallelism and sequence parallelism are its own."""

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(num_experts=4, num_experts_per_tok=2))
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    head_dropout: float = live(0.1, "trainer/align.py", ge=0, lt=1)
    aux_loss_coef: float = live(0.0, "trainer/align.py", ge=0, description="MoE load-balancing loss weight during "
                                "align (the original uses none in this stage; warm-up uses model.router_aux_loss_coef)")


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
        a = self.algorithm
        if a.overlong_buffer is None:  # unset: max_tokens / 2 for dapo (the original's 4096 of 8192), else 0
            # object.__setattr__: plain assignment would re-run validation (validate_assignment)
            object.__setattr__(a, "overlong_buffer", self.rollout.max_tokens // 2 if a.name == "dapo" else 0)
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
    if p.cp > 1:
        out.append(f"parallel.cp={p.cp}: context parallelism is not implemented by any stage yet (use parallel.cp=1)")
    if p.sequence_parallel and p.tp == 1:
        out.append("parallel.sequence_parallel=true needs parallel.tp > 1")
    if m.is_moe:
        if m.num_experts % p.ep:
            out.append(f"parallel.ep={p.ep} must divide model.num_experts={m.num_experts}")
        if m.num_experts_per_tok == 1 and m.norm_topk_prob:
            out.append("model.num_experts_per_tok=1 needs model.norm_topk_prob=false (renormalising one expert's "
                       "weight always gives 1; Megatron refuses it)")
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
    if cfg.trainer.stage in ("align", "rl"):
        out += rollout_problems(cfg, ws)
    return out


def rollout_problems(cfg: PrismConfig, world_size: int | None = None) -> list[str]:
    """Engine lengths against the stage's: a prompt and its response must fit the engine's context, and (without
    chunked prefill) a prompt must fit one engine step. Colocated engines against the trainer's ranks (when
    `world_size` is known): each engine shares the devices of engine_tp of them."""
    r, need = cfg.rollout, cfg.data.max_prompt_length + cfg.rollout.max_tokens
    sum_ = f"data.max_prompt_length + rollout.max_tokens = {cfg.data.max_prompt_length} + {r.max_tokens} = {need}"
    out = []
    if r.max_model_len is not None and r.max_model_len < need:
        out.append(f"rollout.max_model_len={r.max_model_len} must be >= {sum_}")
    context = r.max_model_len or need
    if r.max_num_batched_tokens is not None and r.max_num_batched_tokens < context and not r.enable_chunked_prefill:
        out.append(f"rollout.max_num_batched_tokens={r.max_num_batched_tokens} must be >= the engine context "
                   f"{context} ({'rollout.max_model_len' if r.max_model_len else sum_}) unless "
                   f"rollout.enable_chunked_prefill=true")
    if r.mode == "colocated" and world_size is not None and r.num_engines * r.engine_tp > world_size:
        out.append(f"rollout.num_engines*rollout.engine_tp={r.num_engines}*{r.engine_tp}="
                   f"{r.num_engines * r.engine_tp} must be <= the {world_size} trainer ranks when "
                   f"rollout.mode=colocated (each engine shares the devices of engine_tp trainer ranks)")
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
