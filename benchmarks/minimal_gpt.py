"""The reference point of the throughput target: a minimal compiled GPT of a preset's shape, side by side.

Usage: python benchmarks/minimal_gpt.py [--preset 25m] [--vocab 32000] [--seq-len 1024] [--batch-size 64]
       [--steps 60] [--log-every 10] [--compile/--no-compile] [--device auto]
The issue's yardstick ("a minimal compiled GPT of that shape reaches 2.2M tok/s, 37% MFU" for 25m on
one H100) measured on the machine at hand: nanoGPT's recipe — learned positions, LayerNorm, GELU MLP
4× wide, tied embedding, SDPA causal attention, fused AdamW, bf16 autocast, torch.compile, materialized
logits — at the layers, width and heads of our preset, on random tokens already on the device (no data
loading at all). MFU uses the same FLOP count and peak table as `fidellm train`. Run it next to
`bench_train.py` so our engine's number has its baseline from the same GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from common import MARKDOWN_HEADER, markdown_row
from torch import nn

from fidellm.models.llama import pad_vocab, preset
from fidellm.train.monitor import peak_flops


class Block(nn.Module):
    """Pre-norm block: causal self-attention and a GELU MLP, no biases."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.up, self.down = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, dim))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class MinimalGPT(nn.Module):
    """Token + position embeddings, blocks, final norm, tied output head; returns the mean loss."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tokens(inputs) + self.positions(torch.arange(inputs.shape[1], device=inputs.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def flops_per_token(model: MinimalGPT, layers: int, dim: int, seq_len: int) -> float:
    """6 per matmul parameter (head included, lookups excluded) + 12·layers·dim·seq (as fidellm train)."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.ndim == 2)
    matmul -= model.positions.weight.numel()  # tokens.weight is the head: counted once, as a matmul
    return 6.0 * matmul + 12 * layers * dim * seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="25m")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    shape = preset(args.preset, args.vocab)
    dim, layers, heads = shape.hidden_size, shape.num_hidden_layers, shape.num_attention_heads
    model = MinimalGPT(pad_vocab(args.vocab), dim, layers, heads, args.seq_len).to(device)
    flops = flops_per_token(model, layers, dim, args.seq_len)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    step_fn = torch.compile(model) if args.compile else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    data = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), device=device)
    inputs, targets = data[:, :-1], data[:, 1:]
    rates, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        with amp:
            loss = step_fn(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0:
            value = loss.item()  # syncs: the interval's time is real
            now = time.perf_counter()
            rates.append(args.log_every * args.batch_size * args.seq_len / (now - started))
            started = now
            print(f"step {step}: loss {value:.3f}, {rates[-1]:,.0f} tok/s", flush=True)
    steady = rates[2:] or rates
    parameters = sum(p.numel() for p in model.parameters())
    what = (
        f"minimal {'compiled ' if args.compile else ''}GPT, {args.preset} shape ({parameters:,} params),"
        f" seq {args.seq_len}, batch {args.batch_size}"
    )
    command = "python benchmarks/minimal_gpt.py " + " ".join(sys.argv[1:])
    print(MARKDOWN_HEADER)
    print(markdown_row(what + ": tok/s", command, steady, "tok/s"))
    peak = peak_flops(device)
    if peak is not None:
        print(markdown_row(what + ": MFU", command, [100 * r * flops / peak for r in steady], "%"))
    print(f"median {statistics.median(steady):,.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
