"""The recursive H-Net and the byte-level language model around it.

`HNetStage` is one nesting level: encoder → router → downsample → inner level → EMA → upsample →
+ residual → decoder, or just the main network at the innermost level. State-dict keys match the
reference (`embeddings.weight`, `backbone.encoder.layers.0.mixer.in_proj.weight`,
`backbone.main_network.pad_dimension`, `backbone.main_network.main_network.layers.0.mixer.Wqkv.weight`,
`lm_head.weight`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fidellm.errors import FidelError
from fidellm.models.blocks import RMSNorm
from fidellm.models.hnet.config import HNetConfig, Layout
from fidellm.models.hnet.layers import Isotropic, LayerCache
from fidellm.models.hnet.mamba2 import Mamba2
from fidellm.models.hnet.routing import (
    EMA_CLAMP,
    RouterOutput,
    RoutingModule,
    confidence,
    downsample,
    ema,
    ratio_loss,
    straight_through,
    upsample,
)
from fidellm.models.llama import INIT_STD, LMOutput
from fidellm.models.loss import check_reduction, keep_last, logits_loss

RESIDUAL_OUTPUTS = ("out_proj", "fc2")


@dataclass
class HNetOutput(LMOutput):
    """LMOutput plus the routing terms. `loss` is the cross-entropy alone (bits per byte stay honest);
    training minimises `loss + aux_loss`. Per chunking stage, outermost first: the ratio losses and
    the achieved bytes per chunk (detached; log them to catch a collapsing router)."""

    aux_loss: Tensor | None = None
    ratio_losses: list[Tensor] = field(default_factory=list)
    bytes_per_chunk: list[Tensor] = field(default_factory=list)


@dataclass
class StageCache:
    """One level's generation state: its layers' caches, the router's last x̂ and the EMA's last z̄."""

    main: list[LayerCache] | StageCache
    """The innermost level's layers, or the next level's cache."""
    encoder: list[LayerCache] = field(default_factory=list)
    decoder: list[LayerCache] = field(default_factory=list)
    last_h: Tensor | None = None  # (batch, 1, dim)
    last_z: Tensor | None = None  # (batch, 1, dim), fp32


@dataclass
class HNetCache:
    """Generation state of a whole model: sized by the first (prefill) call, then extended byte by byte."""

    stage: StageCache | None = None
    length: int = 0
    """Positions consumed so far (the longest row's)."""


def _last(x: Tensor, counts: Tensor) -> Tensor:
    """x[:, counts - 1] per row as (batch, 1, dim)."""
    return x.gather(1, (counts - 1).clamp(min=0)[:, None, None].expand(-1, 1, x.shape[-1]))


@dataclass
class StageRouting:
    """What one chunking stage decided, with the positions that count at that level."""

    router: RouterOutput
    valid: Tensor


class HNetStage(nn.Module):
    """One nesting level of the H-Net; `stage` 0 is the outermost."""

    def __init__(self, config: HNetConfig, layout: Layout, stage: int):
        super().__init__()
        dim = config.d_model[stage]
        self.stage = stage
        self.chunk_size = config.chunk_size
        self.innermost = len(layout) == 1
        widen = dim - config.d_model[stage - 1] if stage else 0
        self.pad_dimension = nn.Parameter(torch.zeros(widen)) if widen else None
        if self.innermost:
            self.main_network: nn.Module = Isotropic(layout[0], config, stage)
            return
        self.encoder = Isotropic(layout[0], config, stage)
        self.routing_module = RoutingModule(dim)
        self.main_network = HNetStage(config, layout[1], stage + 1)
        self.decoder = Isotropic(layout[2], config, stage)
        self.residual_proj = nn.Linear(dim, dim, bias=True)

    def _residual(self, h: Tensor) -> Tensor:
        """The skip path around the inner network, always in fp32 (also under autocast)."""
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), self.residual_proj.weight.float(), self.residual_proj.bias.float())

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> StageCache:
        """Empty generation state for this level and every level inside it."""
        if isinstance(self.main_network, Isotropic):
            return StageCache(self.main_network.new_cache(batch, device, dtype))
        assert isinstance(self.main_network, HNetStage)
        return StageCache(
            self.main_network.new_cache(batch, device, dtype),
            self.encoder.new_cache(batch, device, dtype),
            self.decoder.new_cache(batch, device, dtype),
        )

    def _widen(self, x: Tensor) -> Tensor:
        if self.pad_dimension is None:
            return x
        return torch.cat((x, self.pad_dimension.to(x.dtype).expand(*x.shape[:-1], -1)), dim=-1)

    def forward(
        self, x: Tensor, valid: Tensor, doc_start: Tensor, cache: StageCache | None = None
    ) -> tuple[Tensor, list[StageRouting]]:
        """x (batch, seq, width of the enclosing level); valid / doc_start (batch, seq) bool, padding
        trailing. With `cache` (prefill) every level's state is left at each row's last real position."""
        width = x.shape[-1]
        x = self._widen(x)
        cache_valid = None if cache is None else valid
        if self.innermost:
            layers = None if cache is None else cache.main
            return self.main_network(x, layers, cache_valid)[..., :width], []
        h = self.encoder(x, None if cache is None else cache.encoder, cache_valid)
        residual = self._residual(h)
        router = self.routing_module(h, valid, doc_start)
        inner, order, inner_valid = downsample(h, router.boundary)
        inner_doc_start = doc_start.gather(1, order) & inner_valid
        inner_cache = None if cache is None else cache.main
        z, inner_routing = self.main_network(inner, inner_valid, inner_doc_start, inner_cache)
        smoothed = ema(z, router.prob.gather(1, order), self.chunk_size)
        if cache is not None:
            cache.last_h, cache.last_z = _last(h, valid.sum(1)), _last(smoothed, inner_valid.sum(1))
        out = upsample(smoothed, router.boundary) * straight_through(confidence(router))[..., None] + residual
        y = self.decoder(out, None if cache is None else cache.decoder, cache_valid)
        return y[..., :width], [StageRouting(router, valid), *inner_routing]

    def step(self, x: Tensor, active: Tensor, doc_start: Tensor, cache: StageCache) -> Tensor:
        """One new position per row, x (batch, 1, width); only rows with `active` (batch,) advance.

        The inner level runs for every row but commits state only where this position starts a
        chunk (b = 1, the same p > 0.5 rule as the full forward); elsewhere z̄ stays the last one.
        """
        width = x.shape[-1]
        x = self._widen(x)
        if isinstance(cache.main, list):
            return self.main_network(x, cache.main, active[:, None], step=True)[..., :width]
        assert cache.last_h is not None and cache.last_z is not None
        h = self.encoder(x, cache.encoder, active[:, None], step=True)
        residual = self._residual(h)
        router = self.routing_module(h, active[:, None], doc_start, cache.last_h)
        cache.last_h = torch.where(active[:, None, None], h, cache.last_h)
        boundary = router.boundary[:, 0]
        z = self.main_network.step(h, boundary, doc_start & boundary[:, None], cache.main)
        prob = router.prob.clamp(EMA_CLAMP, 1.0 - EMA_CLAMP)[..., None]
        smoothed = torch.where(boundary[:, None, None], prob * z + (1 - prob) * cache.last_z, cache.last_z)
        cache.last_z = smoothed
        out = smoothed * straight_through(confidence(router))[..., None] + residual
        return self.decoder(out, cache.decoder, active[:, None], step=True)[..., :width]


class HNetFeatures(nn.Module):
    """Byte embeddings and the hierarchical backbone of an H-Net: input_ids -> hidden (batch, seq, d_model),
    the states its LM head reads (shares the model's parameters)."""

    def __init__(self, model: HNetForCausalLM):
        super().__init__()
        self.embeddings, self.backbone, self.check = model.embeddings, model.backbone, model._check_inputs
        self.bos_id = model.config.bos_token_id

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        valid = self.check(input_ids, attention_mask)
        hidden, _ = self.backbone(self.embeddings(input_ids), valid, input_ids == self.bos_id, None)
        return hidden


class HNetForCausalLM(nn.Module):
    """Byte-level H-Net language model: untied byte embeddings and LM head around the recursive backbone."""

    def __init__(self, config: HNetConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model[0])
        self.backbone = HNetStage(config, config.layout, 0)
        self.lm_head = nn.Linear(config.d_model[0], config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear N(0, 0.02); out_proj / fc2 scaled by 1/√(residual branches of their stack); embeddings
        N(0, 1); residual_proj and pad_dimension zero; routers identity; Mamba-2 SSM init."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for module in self.modules():
            if isinstance(module, Isotropic):
                std = INIT_STD / math.sqrt(max(module.num_residual_branches(), 1))
                for name, linear in module.named_modules():
                    if name.endswith(RESIDUAL_OUTPUTS) and isinstance(linear, nn.Linear):
                        nn.init.normal_(linear.weight, mean=0.0, std=std)
            elif isinstance(module, Mamba2):
                module.conv1d.reset_parameters()
                module.reset_ssm_parameters()
                nn.init.ones_(module.norm.weight)
            elif isinstance(module, RoutingModule):
                module.reset_parameters()
            elif isinstance(module, HNetStage):
                if module.pad_dimension is not None:
                    nn.init.zeros_(module.pad_dimension)
                if not module.innermost:
                    nn.init.zeros_(module.residual_proj.weight)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """The valid-position mask; padding must be trailing (right-padded rows)."""
        if input_ids.dim() != 2:
            raise FidelError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise FidelError(
                f"{input_ids.shape[1]} bytes exceed the model's context of"
                f" {self.config.max_position_embeddings} (max_position_embeddings)"
            )
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise FidelError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        valid = attention_mask.bool()
        if not bool(valid[:, 0].all()) or bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise FidelError("H-Net batches must be right-padded: attention_mask rows of 1s then 0s, from 1")
        return valid

    def features(self) -> HNetFeatures:
        """The module mapping bytes to final hidden states (what downstream heads train on)."""
        return HNetFeatures(self)

    def new_cache(self) -> HNetCache:
        """An empty generation cache; the first forward call with it (the prefill) sizes it."""
        return HNetCache()

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        cache: HNetCache | None = None,
        attention_mask: Tensor | None = None,
        reduction: str = "mean",
        logits_to_keep: int = 0,
    ) -> HNetOutput:
        """Next-byte logits (batch, seq, vocab) of `input_ids` (batch, seq).

        `targets` are already shifted (targets[:, t] follows input_ids[:, t]; IGNORE_INDEX skipped), as in
        `LlamaForCausalLM`. `attention_mask` (1 = byte, 0 = trailing padding) keeps padding out of the
        chunking statistics; thanks to causality a padded row's logits equal the row's logits alone.
        With an empty `cache` the call is a prefill (each row's state ends at its last real byte);
        with a filled one every row advances by the given bytes, one recurrent step each. `reduction`
        "none" gives the loss per byte (0 where ignored), and `logits_to_keep` N > 0 the logits (and
        loss) of the last N positions only, as in `LlamaForCausalLM`.
        """
        check_reduction(reduction)
        if cache is not None and cache.stage is not None:
            logits = self._steps(input_ids, cache, attention_mask)
            if logits_to_keep:
                logits, targets = keep_last(logits, targets, logits_to_keep)
            return HNetOutput(logits, logits_loss(logits, targets, reduction))
        valid = self._check_inputs(input_ids, attention_mask)
        x = self.embeddings(input_ids)
        stage_cache = None
        if cache is not None:
            stage_cache = self.backbone.new_cache(input_ids.shape[0], input_ids.device, x.dtype)
            cache.stage, cache.length = stage_cache, input_ids.shape[1]
        hidden, routing = self.backbone(x, valid, input_ids == self.config.bos_token_id, stage_cache)
        if logits_to_keep:
            hidden, targets = keep_last(hidden, targets, logits_to_keep)
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        ratio_losses, bytes_per_chunk = [], []
        total_bytes = valid.sum()
        for stage, target in zip(routing, self.config.target_ratio, strict=True):
            ratio_losses.append(ratio_loss(stage.router, stage.valid, target))
            bytes_per_chunk.append((total_bytes / stage.router.boundary.sum().clamp(min=1)).detach())
        aux_loss = self.config.ratio_loss_weight * torch.stack(ratio_losses).sum() if ratio_losses else None
        loss = logits_loss(logits, targets, reduction)
        return HNetOutput(logits, loss, aux_loss, ratio_losses, bytes_per_chunk)

    def _steps(self, input_ids: Tensor, cache: HNetCache, attention_mask: Tensor | None) -> Tensor:
        """Advance every row of a filled cache by input_ids (batch, seq), one byte at a time; the logits."""
        assert cache.stage is not None
        if attention_mask is not None:
            raise FidelError("H-Net cached steps advance every row: pass attention_mask at the prefill only")
        if cache.length + input_ids.shape[1] > self.config.max_position_embeddings:
            raise FidelError(
                f"{input_ids.shape[1]} bytes after {cache.length} cached positions exceed the model's"
                f" context of {self.config.max_position_embeddings} (max_position_embeddings)"
            )
        active = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = []
        for t in range(input_ids.shape[1]):
            ids = input_ids[:, t : t + 1]
            doc_start = ids == self.config.bos_token_id
            hidden = self.backbone.step(self.embeddings(ids), active, doc_start, cache.stage)
            logits.append(self.lm_head(hidden.to(self.lm_head.weight.dtype)))
            cache.length += 1
        return torch.cat(logits, dim=1)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters; without the byte embedding and LM head when `exclude_embeddings`."""
        unique = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in unique.values())
        if exclude_embeddings:
            total -= self.embeddings.weight.numel() + self.lm_head.weight.numel()
        return total
