"""Muon's Newton-Schulz under FSDP2 and DDP, run once per matrix in the job instead of once per process.

FSDP2 shards each matrix by rows over the processes of a 1-D mesh, and Newton-Schulz needs the whole
matrix. Gathering every whole update on every process (an all-gather per matrix) makes each process
run the iteration on every matrix: the job does it `world` times over. Here each matrix of a group of
one shape gets an owner (round robin): one all_to_all sends every process's rows of a matrix's update
to its owner, the owner orthogonalizes its matrices in one batch, and a second all_to_all sends each
process its rows of the results. Each process then computes about 1/world of the iterations and
receives about 2/world of the group's bytes, where the all-gather brought (world − 1)/world.
Under DDP, where every process holds every matrix whole, each process orthogonalizes its share and one
all-gather brings the rest. The result is the same, bit for bit: a matrix's iteration does not depend on
the batch it runs in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from fidellm.train.distributed import is_dtensor


def row_sharded(param: Tensor) -> bool:
    """Whether `param` is an FSDP2 DTensor sharded by rows over a 1-D mesh (the layout handled here)."""
    if not is_dtensor(param):
        return False
    placements = param.placements  # type: ignore[attr-defined]
    return param.device_mesh.ndim == 1 and len(placements) == 1 and placements[0].is_shard(0)  # type: ignore[attr-defined]


def rows_per_process(part: Tensor, group: dist.ProcessGroup) -> list[int]:
    """How many rows of a matrix each process of `group` holds, given this process's `part` (one
    all-gather; the same for every matrix of one shape)."""
    mine = torch.tensor([part.shape[0]], dtype=torch.int64, device=part.device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return [int(count) for count in torch.cat(gathered).tolist()]


def orthogonalize_sharded(
    parts: list[Tensor],
    rows: list[int],
    owners: list[int],
    group: dist.ProcessGroup,
    orthogonalize: Callable[[Tensor], Tensor],
) -> list[Tensor]:
    """This process's rows of each orthogonalized matrix.

    `parts[j]`: this process's rows of matrix j (all of one shape, `rows[p]` rows on process p);
    `owners[j]`: the process that orthogonalizes matrix j; `orthogonalize` maps a batch (n, rows, cols)
    to its results in the parts' dtype. Every process of `group` calls this with the same matrices in
    the same order.
    """
    me, world = dist.get_rank(group), dist.get_world_size(group)
    cols = parts[0].shape[1]
    by_owner = _by_owner(owners, world)
    mine = len(by_owner[me])
    # 1. every process's rows of matrix j to its owner: sent grouped by owner, received grouped by sender
    send = _flat([parts[j] for held in by_owner for j in held], parts[0])
    received = send.new_empty(mine * sum(rows) * cols)
    dist.all_to_all_single(
        received,
        send,
        [mine * rows[p] * cols for p in range(world)],
        [len(held) * rows[me] * cols for held in by_owner],
        group=group,
    )
    pieces = received.split([mine * rows[p] * cols for p in range(world)])
    whole = torch.cat([piece.view(mine, rows[p], cols) for p, piece in enumerate(pieces)], dim=1)
    results = orthogonalize(whole)  # an empty batch when this process owns none of the matrices
    # 2. each process its rows of the owner's results: sent grouped by receiver, received grouped by owner
    starts = [sum(rows[:p]) for p in range(world)]
    send = _flat([results[:, starts[p] : starts[p] + rows[p]] for p in range(world)], parts[0])
    received = send.new_empty(len(parts) * rows[me] * cols)
    dist.all_to_all_single(
        received,
        send,
        [len(held) * rows[me] * cols for held in by_owner],
        [mine * rows[p] * cols for p in range(world)],
        group=group,
    )
    ordered = (j for held in by_owner for j in held)
    own = dict(zip(ordered, received.view(len(parts), rows[me], cols).unbind(0), strict=True))
    return [own[j] for j in range(len(parts))]


def orthogonalize_replicated(
    updates: list[Tensor],
    owners: list[int],
    group: dist.ProcessGroup,
    orthogonalize: Callable[[Tensor], Tensor],
) -> list[Tensor]:
    """Each matrix's orthogonalized update on every process of `group`, for parameters every process
    holds whole (DDP): each process orthogonalizes the matrices it owns (`owners[j]`), and one
    all-gather, padded to the largest share, brings the others' results."""
    me, world = dist.get_rank(group), dist.get_world_size(group)
    by_owner = _by_owner(owners, world)
    shape = updates[0].shape
    held = by_owner[me]
    ours = orthogonalize(torch.stack([updates[j] for j in held]) if held else updates[0].new_empty(0, *shape))
    share = max(len(owned) for owned in by_owner)
    padded = torch.cat([ours, ours.new_zeros(share - len(held), *shape)])
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    results = {j: gathered[p][m] for p, owned in enumerate(by_owner) for m, j in enumerate(owned)}
    return [results[j] for j in range(len(updates))]


def _by_owner(owners: list[int], world: int) -> list[list[int]]:
    """For each process, the indices of the matrices it owns, in order."""
    return [[j for j, owner in enumerate(owners) if owner == p] for p in range(world)]


def _flat(tensors: list[Tensor], like: Tensor) -> Tensor:
    """The tensors' elements one after another in one 1-D tensor (an empty one of `like`'s dtype when
    there are none)."""
    if not tensors:
        return like.new_empty(0)
    return torch.cat([t.reshape(-1) for t in tensors])
