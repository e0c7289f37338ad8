"""The configuration of a training run: `TrainConfig` (stored in RUN/train/config.json and every
checkpoint), its checks, and the model config it implies for a tokenizer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fidellm.errors import FidelError
from fidellm.models.factory import ARCHS, ModelConfig, preset_config
from fidellm.models.loss import DEFAULT_CHUNK_TOKENS
from fidellm.train.average import check_decay
from fidellm.train.curriculum import DEFAULT_SPAN
from fidellm.train.distributed import STRATEGIES
from fidellm.train.optim import OPTIMIZERS, SCHEDULES

DTYPES = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Everything a pretraining run depends on (stored in RUN/train/config.json and every checkpoint)."""

    arch: str = "llama"
    """"llama" (on the run's tokenizer: BPE or bytes) or "hnet" (bytes: the run's tokenizer must be the
    byte tokenizer)."""
    preset: str | None = "tiny"
    """The model size (fidellm.models.*.presets); None with a base model, whose own config trains."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Model config fields replacing the preset's (e.g. {"num_hidden_layers": 2, "dropout": 0.1})."""
    stage_lr_multipliers: list[float] = field(default_factory=list)
    """H-Net: learning-rate factor per stage, outermost first (empty: 1 everywhere)."""
    unfreeze: str | list | None = None
    """Progressive unfreezing: a preset name ("hnet-design-notes") or [[step, [name patterns]], ...]."""
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    stop_at_step: int | None = None
    """Stop (with a checkpoint) after this step although the schedule spans max_steps; resume later."""
    lr: float = 3e-3
    optimizer: str = "adamw"
    """"adamw", or "muon": Muon on the hidden matrices, AdamW on the rest (fidellm.train.optim)."""
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a GradScaler."""
    compile: bool = False
    compile_mode: str = "default"
    """torch.compile mode; "reduce-overhead" and "max-autotune" also capture CUDA graphs."""
    loss_chunk: int = DEFAULT_CHUNK_TOKENS
    """Llama: tokens per chunk of the fused output-projection loss (fidellm.models.loss); 0 = all logits."""
    document_mask: bool = False
    """Llama: attention stays inside each document of a packed window (a BOS starts the next one)."""
    gradient_checkpointing: bool = False
    device: str = "auto"
    strategy: str = "ddp"
    """Under torchrun: "ddp" (replicated model) or "fsdp" (FSDP2, parameters sharded per block)."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard events under RUN/train/tensorboard/."""
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    resume: bool = True
    echo: bool = True
    data: str = "tokens"
    """"tokens": pretraining on RUN/tokens; "chat": SFT on chat_dir/{train,eval}.jsonl (fidellm.sft.data)."""
    chat_dir: str | None = None
    """Chat data directory (default RUN/chat)."""
    max_samples: int | None = None
    """Chat: train on the first N conversations of train.jsonl only."""
    epochs: int | None = None
    """When set, max_steps becomes epochs × the data's batches per epoch ÷ grad_accum."""
    best_by_sources: list[str] = field(default_factory=list)
    """Keep as RUN/train/best the weights with the lowest val bits/byte over these sources' text (e.g. the
    modern ones) instead of the lowest val loss over the whole split."""
    base: str | None = None
    """A model (anything `fidellm.models.load.load_model` reads) to start from instead of random weights;
    its tokenizer must be the run's (same fingerprint), and its config replaces preset/model_overrides."""
    lora: dict[str, Any] | None = None
    """LoRA spec (`fidellm.sft.lora.lora_spec`): adapters on the base model, everything else frozen."""
    curriculum: bool = False
    """Draw the training data easy to hard by complexity stage (fidellm.train.curriculum)."""
    curriculum_span: float = DEFAULT_SPAN
    """Share of the steps over which the five stages are unlocked; all data is drawn after it."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (0.99: about the last 100 steps)
    and evaluate, keep and export it instead of the last step's weights (fidellm.train.average)."""

    def validate(self) -> None:
        """Reject impossible settings before anything is loaded."""
        positive = (
            "seq_len",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "log_every",
            "eval_batches",
        )
        for name in (*positive, "save_every"):
            if getattr(self, name) < (1 if name in positive else 0):
                raise FidelError(f"train config: {name} must be positive, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise FidelError(f"train config: schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise FidelError(
                f"train config: optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise FidelError(
                f"train config: compile_mode {self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}"
            )
        if self.compile_mode != "default" and not self.compile:  # it was silently ignored
            raise FidelError(f"train config: compile_mode {self.compile_mode!r} needs compile (--compile)")
        if self.loss_chunk < 0:
            raise FidelError(f"train config: loss_chunk must be 0 (off) or positive, got {self.loss_chunk}")
        if self.dtype not in DTYPES:
            raise FidelError(f"train config: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FidelError(f"train config: lr must be positive and finite, got {self.lr}")
        if self.warmup_steps < 0:
            raise FidelError(f"train config: warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.grad_clip >= 0:  # NaN too: it clipped every gradient to NaN
            raise FidelError(f"train config: grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise FidelError(f"train config: weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if self.stop_at_step is not None and self.stop_at_step < 1:  # 0 would silently mean "no stop"
            raise FidelError(f"train config: stop_at_step must be positive, got {self.stop_at_step}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.decay_fraction <= 1:
            raise FidelError("train config: min_lr_ratio and decay_fraction must lie in [0, 1]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise FidelError(
                f"train config: beta1 and beta2 must lie in [0, 1), got {self.beta1}, {self.beta2}"
            )
        if self.keep_last < 0 or (self.epochs is not None and self.epochs < 1):
            raise FidelError("train config: keep_last must be >= 0 (0 keeps all) and epochs >= 1")
        if self.arch not in ARCHS:
            raise FidelError(f"train config: arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if any(not (m > 0 and math.isfinite(m)) for m in self.stage_lr_multipliers):
            raise FidelError(
                f"train config: stage_lr_multipliers must be positive, got {self.stage_lr_multipliers}"
            )
        if self.strategy not in STRATEGIES:
            raise FidelError(
                f"train config: strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}"
            )
        if self.data not in ("tokens", "chat"):
            raise FidelError(f"train config: data {self.data!r} is not one of tokens, chat")
        if self.preset is None and self.base is None:
            raise FidelError("train config: preset is needed (None only with a base model)")
        if self.lora is not None and self.base is None:
            raise FidelError("train config: lora needs a base model")
        if not 0 < self.curriculum_span <= 1:
            raise FidelError(f"train config: curriculum_span must lie in (0, 1], got {self.curriculum_span}")
        if self.curriculum_span != DEFAULT_SPAN and not self.curriculum:  # it was silently ignored
            raise FidelError(
                f"train config: curriculum_span {self.curriculum_span} needs curriculum (--curriculum)"
            )
        if self.decay_fraction != TrainConfig.decay_fraction and self.schedule != "wsd":  # ignored, too
            raise FidelError(
                f"train config: decay_fraction {self.decay_fraction} needs schedule wsd (--schedule wsd)"
            )
        if self.document_mask and self.arch != "llama":
            raise FidelError("train config: document_mask is implemented for the llama architecture only")
        check_decay(self.ema_decay)
        if self.gradient_checkpointing and self.compile:
            raise FidelError("train config: gradient_checkpointing with compile is not supported together")


def model_config(config: TrainConfig, tokenizer_vocab: int) -> ModelConfig:
    """The preset for this tokenizer with `model_overrides` applied; checked against tokenizer and seq_len."""
    max_positions = max(2048, config.seq_len)
    model = preset_config(config.arch, config.preset, tokenizer_vocab, max_positions, config.model_overrides)
    if model.vocab_size < tokenizer_vocab:
        raise FidelError(
            f"model vocab_size {model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} ids"
        )
    if config.seq_len > model.max_position_embeddings:
        raise FidelError(
            f"seq_len {config.seq_len} exceeds the model's max_position_embeddings"
            f" {model.max_position_embeddings}"
        )
    return model
