"""The training loop: `train(run_dir, config)` reads RUN/tokenizer and its data — the packed token shards
of RUN/tokens (pretraining, Llama or H-Net) or, with `data="chat"`, conversations for SFT with the loss
on assistant tokens (fidellm.sft) — and writes RUN/train/.

RUN/train/ holds config.json, metrics.jsonl, curves.png and checkpoints/step_*/ (see checkpoint.py).
Every check on the config and the data happens before the first step. With `resume` (the default) the
newest checkpoint is loaded and training continues exactly where it stopped: the data order is a
function of (seed, epoch, step) (with `curriculum`, of the sampler's small saved state), and model,
optimizer, schedule step and RNG states are all restored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from fidellm.errors import FidelError
from fidellm.models.factory import (
    arch_of,
    build_model,
    config_to_dict,
    repeated_blocks,
)
from fidellm.models.load import load_model
from fidellm.paths import RunLayout
from fidellm.sft.data import ConversationBatches, chat_data
from fidellm.sft.lora import apply_lora
from fidellm.tokenizer.base import load_tokenizer
from fidellm.tokenizer.shards import TokenShards
from fidellm.train.average import WeightAverage
from fidellm.train.checkpoint import (
    AVERAGE_FILE,
    latest_checkpoint,
    read_checkpoint,
    read_weights,
    refuse_old_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from fidellm.train.config import TrainConfig, model_config
from fidellm.train.curriculum import StagedBatches
from fidellm.train.data import (
    CurriculumWindows,
    DevicePrefetch,
    PackedBatches,
    token_byte_lengths,
    validation_batches,
)
from fidellm.train.distributed import (
    Distributed,
    gradient_sync,
    init_distributed,
    shutdown_distributed,
    wrap_model,
)
from fidellm.train.evaluation import BestWeights, check_selected_sources, evaluate
from fidellm.train.monitor import Monitor, flops_per_token
from fidellm.train.optim import build_optimizer, learning_rate
from fidellm.train.resume import (
    check_data_rows,
    check_last_step,
    check_model_config,
    resume_changes,
    resume_notice,
)
from fidellm.train.step import StepRecord, optimizer_update, updates_skip_on_device
from fidellm.train.unfreeze import UnfreezeSchedule, apply_unfreeze, preset_schedule, validate_schedule

SYNC_FREE_DEVICES = ("cuda",)
"""Devices on which the loop reads each step's loss one step late (on a CPU every op waits anyway)."""


def unfreeze_schedule(config: TrainConfig, model: torch.nn.Module) -> UnfreezeSchedule:
    """The run's unfreezing schedule (validated against the model's parameter names), or [] for none."""
    if config.unfreeze is None:
        return []
    if isinstance(config.unfreeze, str):
        return preset_schedule(config.unfreeze, model, config.max_steps)
    schedule = [tuple(entry) if isinstance(entry, list) else entry for entry in config.unfreeze]
    validate_schedule(model, schedule)  # JSON gives lists; errors name the bad entry
    return schedule


def load_shards(run: RunLayout, split: str, fingerprint: str, vocab: int) -> TokenShards:
    """Shards of `split`, checked to come from this run's tokenizer."""
    shards = TokenShards.from_run(run.root, split)
    made_by = shards.meta.get("tokenizer", {}).get("fingerprint")
    if made_by != fingerprint or shards.meta.get("vocab_size") != vocab:
        raise FidelError(
            f"{shards.directory}: shards were made by another tokenizer than {run.tokenizer}"
            " (fingerprint differs); rerun `fidellm data tokenize RUN`"
        )
    return shards


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    for layer in repeated_blocks(model):
        layer.forward = functools.partial(activation_checkpoint, layer.forward, use_reentrant=False)


def load_base(path: str, fingerprint: str) -> torch.nn.Module:
    """The model at `path` as initial weights, checked to use the run's tokenizer."""
    model, tokenizer_dir = load_model(path)
    if load_tokenizer(tokenizer_dir).fingerprint() != fingerprint:
        raise FidelError(f"base {path}: its tokenizer ({tokenizer_dir}) is not the run's tokenizer")
    return model.train()


def training_source(run: RunLayout, config: TrainConfig) -> Path:
    """Where the training rows come from: the chat directory (data "chat"; default RUN/chat) or
    RUN/tokens/train."""
    if config.data == "chat":
        return Path(config.chat_dir) if config.chat_dir else run.root / "chat"
    return run.tokens / "train"


def training_data(
    run: RunLayout, config: TrainConfig, tokenizer: Any, ctx: Distributed
) -> tuple[PackedBatches | ConversationBatches, list]:
    """(training batches, validation batches) of RUN/tokens or, for data "chat", of the chat JSONL."""
    if config.data == "chat":
        chat_dir = training_source(run, config)
        batches, val_set, counts = chat_data(
            chat_dir, tokenizer, config.seq_len, config.batch_size, config.seed,
            config.eval_batches * ctx.world_size, config.max_samples, ctx.rank, ctx.world_size,
            config.curriculum,
        )  # fmt: skip
        if config.echo and ctx.main:
            print(f"chat data: {json.dumps(counts)}", flush=True)
        return batches, val_set
    train_shards = load_shards(run, "train", tokenizer.fingerprint(), tokenizer.vocab_size)
    val_shards = load_shards(run, "val", tokenizer.fingerprint(), tokenizer.vocab_size)
    batches = (CurriculumWindows if config.curriculum else PackedBatches)(
        train_shards, config.seq_len, config.batch_size, config.seed, ctx.rank, ctx.world_size
    )
    val_set = validation_batches(  # eval_batches global batches, dealt out to the ranks in evaluate
        val_shards, config.seq_len, config.batch_size, config.eval_batches * ctx.world_size
    )
    return batches, val_set


def train(run_dir: str | Path, config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the model of `config` on the run's data; returns a summary with per-step losses.

    Under torchrun every process calls this; the process group is joined here and left at the end.
    """
    config.validate()
    ctx, device = init_distributed(config.device)
    try:
        summary = _train(RunLayout(run_dir), config, ctx, device)
    except BaseException:
        shutdown_distributed(ctx, wait=False)  # the other ranks may never reach a barrier now
        raise
    shutdown_distributed(ctx)
    return summary


def _train(run: RunLayout, config: TrainConfig, ctx: Distributed, device: torch.device) -> dict[str, Any]:
    tokenizer = load_tokenizer(run.tokenizer)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    np.random.seed(config.seed)
    base = load_base(config.base, tokenizer.fingerprint()) if config.base else None
    if base is not None:  # the base's own architecture trains, whatever arch the config names
        config = dataclasses.replace(config, arch=arch_of(base.config))
    mconfig = base.config if base is not None else model_config(config, tokenizer.vocab_size)
    if config.seq_len > getattr(mconfig, "max_position_embeddings", config.seq_len):
        raise FidelError(f"seq_len {config.seq_len} exceeds the base model's max_position_embeddings")
    dtype = config.dtype if config.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if dtype == "fp16" and device.type != "cuda":
        raise FidelError("train config: fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
    out = run.root / "train"
    ckpt_dir = out / "checkpoints"
    if not config.resume:
        refuse_old_checkpoints(ckpt_dir)

    batches, val_set = training_data(run, config, tokenizer, ctx)
    check_selected_sources(config.best_by_sources, val_set)
    if config.epochs is not None:  # an optimizer step draws grad_accum batches (at least one step)
        steps = config.epochs * batches.steps_per_epoch // config.grad_accum
        config = dataclasses.replace(config, max_steps=max(1, steps))
    if isinstance(batches, StagedBatches):
        batches.start_schedule(config.max_steps * config.grad_accum, config.curriculum_span)
        if config.echo and ctx.main:
            print(batches.describe(config.grad_accum), flush=True)
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))
    byte_lengths = torch.cat(
        [byte_lengths, torch.zeros(mconfig.vocab_size - len(byte_lengths), dtype=torch.int64)]
    )
    byte_lengths = byte_lengths.to(device)

    model = (base if base is not None else build_model(mconfig)).to(device)
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    if hasattr(model, "loss_chunk_tokens"):
        model.loss_chunk_tokens = config.loss_chunk
    if config.document_mask:
        if not hasattr(model, "document_masking"):  # an H-Net base model
            raise FidelError("train config: document_mask is implemented for the llama architecture only")
        model.document_masking = True
    parameters = model.num_parameters()
    flops = flops_per_token(model, config.seq_len)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    wrapped = wrap_model(model, ctx, device, config.strategy)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    if ctx.rank:
        torch.manual_seed(config.seed + 1_000_003 * ctx.rank)  # other dropout masks on other ranks
    optimizer = build_optimizer(
        model, config.lr, config.weight_decay, (config.beta1, config.beta2),
        stage_lr_multipliers=config.stage_lr_multipliers, kind=config.optimizer,
        process_group=dist.group.WORLD if ctx.enabled and config.strategy == "ddp" else None,
    )  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    schedule = unfreeze_schedule(config, model)
    if schedule and ctx.enabled:
        raise FidelError("train config: progressive unfreezing is single-process only for now (no torchrun)")
    boundaries = {start for start, _ in schedule}
    step = 0
    stop = min(config.max_steps, config.stop_at_step or config.max_steps)
    previous = latest_checkpoint(ckpt_dir) if config.resume else None
    changes: dict[str, Any] = {}  # honored trajectory changes of a resumed run
    if previous is not None:
        loaded = read_checkpoint(previous)
        check_model_config(previous, loaded.field("model_config"), config_to_dict(mconfig))
        changes = resume_changes(
            previous, loaded.state.get("train_config"), loaded.state.get("world_size"),
            dataclasses.asdict(config), ctx.world_size, run.root,
        )  # fmt: skip
        check_last_step(previous, loaded.step, config.max_steps, config.stop_at_step)
        rows = batches.n_rows
        check_data_rows(previous, loaded.state.get("data_rows"), rows, training_source(run, config), run.root)
        restore_checkpoint(loaded, model, optimizer, scaler, rank=ctx.rank)
        if average is not None:  # resume_changes refused turning the average on, so the file is there
            if not (previous / AVERAGE_FILE).is_file():
                raise FidelError(f"{previous}: the run keeps a weight average but {AVERAGE_FILE} is missing")
            average.load_full_state(read_weights(model, previous / AVERAGE_FILE))
        batches.load_state_dict(loaded.field("data"))
        step = loaded.step
        if config.echo and ctx.main:
            print(resume_notice(previous, step, stop, changes), flush=True)
    forward = torch.compile(wrapped, mode=config.compile_mode) if config.compile else wrapped
    cuda_graphs = config.compile and config.compile_mode in ("reduce-overhead", "max-autotune")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    autocast = functools.partial(
        torch.autocast, device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )

    resumed = None if previous is None else {"from": str(previous), "step": step, "changed": changes}
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(
            json.dumps(
                {"train": dataclasses.asdict(config), "model": config_to_dict(mconfig),
                 "world_size": ctx.world_size, "resumed": resumed}, indent=2,
            ) + "\n"
        )  # fmt: skip
    monitor = Monitor(
        out, device, flops, config.max_steps, step, config.echo and ctx.main,
        n_devices=ctx.world_size, write=ctx.main, tensorboard=config.tensorboard,
    )  # fmt: skip
    data = DevicePrefetch(batches, device)
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len * ctx.world_size

    def save(at: int, data_state: dict[str, Any] | None = None) -> Path:
        state = {
            "data": data_state if data_state is not None else data.state_dict(),
            "model_config": config_to_dict(mconfig),
            "train_config": dataclasses.asdict(config),
            "data_rows": batches.n_rows,  # a resume on changed data is refused (check_data_rows)
        }
        averaged = average.full_state() if average is not None else None
        return save_checkpoint(ckpt_dir, at, model, optimizer, state, config.keep_last, scaler, ctx, averaged)

    def stop_if_not_finite(record: StepRecord) -> None:
        """Stop on a non-finite loss, saving the state before that step (its update never happened)."""
        if not record.finite():
            optimizer.zero_grad(set_to_none=True)
            path = save(record.step - 1, record.data_state)
            raise FidelError(
                f"non-finite loss ({record.values()[0]}) at step {record.step}; the state before it is"
                f" saved in {path}"
            )

    def report(record: StepRecord) -> None:
        """Check a finished step, fold its weights into the average, keep its loss, log it on log steps.
        The model still holds the weights after `record.step` (a sync-free loop reports a step before
        the next update)."""
        stop_if_not_finite(record)
        if average is not None:
            average.update(record.step)
        losses.append(record.values()[0])  # the logged loss is the cross-entropy alone
        if record.step % config.log_every == 0 or record.step == stop:
            chunks = [float(x) for x in record.chunks]
            monitor.log_train(record.step, losses[-1], record.lr, record.grad_norm(), chunks or None)

    best = BestWeights(out / "best", config.best_by_sources, resumed=previous is not None)
    losses: list[float] = []
    val: dict[str, Any] = {}
    start_step, started = step, time.perf_counter()
    sync_free = updates_skip_on_device(optimizer) and device.type in SYNC_FREE_DEVICES
    pending: StepRecord | None = None  # sync-free: the last step, reported after the next one's backward
    wrapped.train()
    if schedule:
        apply_unfreeze(model, schedule, step)
    while step < stop:
        if schedule and step in boundaries:
            trainable = apply_unfreeze(model, schedule, step)
            if config.echo and ctx.main:
                print(f"step {step}: unfreezing, {len(trainable)} parameter tensors now train", flush=True)
        lr = learning_rate(
            config.schedule, step, config.lr, config.warmup_steps, config.max_steps,
            config.min_lr_ratio, config.decay_fraction,
        )  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        total = torch.zeros(2, device=device)  # cross-entropy, auxiliary (H-Net ratio) loss
        for micro in range(config.grad_accum):
            inputs, targets = data.next_batch()
            if cuda_graphs:  # the previous replay's outputs are consumed; its buffers may be reused
                torch.compiler.cudagraph_mark_step_begin()
            with gradient_sync(wrapped, ctx, micro == config.grad_accum - 1):
                with autocast():
                    output = forward(inputs, targets)
                    aux = getattr(output, "aux_loss", None)
                    aux = torch.zeros_like(output.loss) if aux is None else aux
                    parts = torch.stack([output.loss, aux]).float() / config.grad_accum
                scaler.scale(parts.sum()).backward()
            total += parts.detach()
        data.prefetch()  # assemble and copy the next batch while this step's backward runs
        record = StepRecord(step + 1, lr, data.state_dict(), ctx.mean(total))
        record.chunks = [
            x.detach().clone() for x in getattr(output, "bytes_per_chunk", [])
        ]  # CUDA graphs reuse outputs
        if pending is not None:
            report(pending)  # the previous step's numbers arrived long ago: no stall
            pending = None
        if not sync_free:
            stop_if_not_finite(record)  # before the update: a bad step never changes the weights
        record.norm = optimizer_update(model, optimizer, scaler, config.grad_clip, record.losses, sync_free)
        step += 1
        monitor.count(tokens_per_step)
        if sync_free:
            record.send_to_host()
            pending = record
        else:
            report(record)
        at_eval = step % config.eval_every == 0 or step == stop
        at_save = (config.save_every and step % config.save_every == 0) or step == stop
        if pending is not None and (at_eval or at_save):
            report(pending)  # these sync anyway; a non-finite step must stop before they run
            pending = None
        if at_eval:
            with monitor.paused():
                trained = None  # with an average, the trained weights' figures beside the average's
                if average is not None:
                    own = evaluate(forward, val_set, byte_lengths, device, autocast, ctx)
                    trained = (own.loss, own.bpb)
                with average.applied() if average is not None else nullcontext():
                    result = evaluate(forward, val_set, byte_lengths, device, autocast, ctx)
                    score, by_source = best.score_of(result), result.source_bpb()
                    selected = score if config.best_by_sources else None  # the chosen sources' curve
                    monitor.log_val(step, result.loss, result.bpb, by_source, selected, trained)
                    val = {"val_loss": result.loss, "val_bpb": result.bpb, "val_bpb_by_source": by_source}
                    best.offer(step, result, score, model, {"model_config": config_to_dict(mconfig)}, ctx)
        if at_save:
            with monitor.paused():
                save(step)
    monitor.close()
    seconds = time.perf_counter() - started
    trained = step - start_step
    return {
        "run_dir": str(run.root),
        "resumed_from": start_step,
        "step": step,
        "world_size": ctx.world_size,
        "losses": losses,
        "seconds": seconds,
        "tokens_per_s": trained * tokens_per_step / max(seconds, 1e-9),
        "parameters": parameters,
        "checkpoint": str(latest_checkpoint(ckpt_dir)),
        "best": best.summary(),
        **val,
    }
