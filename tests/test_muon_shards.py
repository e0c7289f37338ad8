"""Muon's Newton-Schulz shared among processes (`fidellm.train.muon_shards`): three gloo processes holding
uneven row shards (one of them none) get exactly their rows of each whole matrix's orthogonalized update,
and processes holding whole matrices (DDP) get every whole result, whichever process owns a matrix, also
when some processes own none."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fidellm.train.muon import orthogonalize
from fidellm.train.muon_shards import orthogonalize_replicated, orthogonalize_sharded, rows_per_process

WORLD = 3
CASES = [  # (shape, matrices, first owner): 7 rows → 3, 3, 1; 2 rows → 1, 1, 0; 4 matrices over 3 owners
    ((7, 5), 4, 1),
    ((2, 5), 2, 2),
    ((5, 9), 1, 0),
]


def _worker(rank: int, store_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
    try:
        group = dist.group.WORLD
        for (shape, count, first), seed in zip(CASES, range(len(CASES)), strict=True):
            whole = torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))
            shards = [list(matrix.chunk(WORLD)) for matrix in whole]
            parts = [(s[rank] if rank < len(s) else s[0][:0]).contiguous() for s in shards]
            rows = rows_per_process(parts[0], group)
            assert rows == [len(shards[0][p]) if p < len(shards[0]) else 0 for p in range(WORLD)]
            owners = [(first + j) % WORLD for j in range(count)]
            got = orthogonalize_sharded(parts, rows, owners, group, orthogonalize)
            start = sum(rows[:rank])
            expected = orthogonalize(whole)[:, start : start + rows[rank]]
            assert len(got) == count
            for j in range(count):
                assert torch.equal(got[j], expected[j]), (shape, j, rank)
            replicated = orthogonalize_replicated(list(whole), owners, group, orthogonalize)
            assert len(replicated) == count
            for j in range(count):
                assert torch.equal(replicated[j], orthogonalize(whole)[j]), (shape, j, rank)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Passed: exit without tearing the gloo group down, which deadlocks now and then in torch 2.4.1
    # (~ProcessGroupGloo joins a gloo thread that waits for the GIL the main thread holds).
    os._exit(0)


def test_sharded_newton_schulz_equals_whole_matrices(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
