"""Seeded subsets for `--limit` runs of the evaluations: a quick run sees a random sample kept in file
order, the same one for the same seed, never just the first N lines (files group items by source)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from fidellm.errors import FidelError

T = TypeVar("T")


def limited(
    items: Sequence[T], limit: int | None, seed: int, group: Callable[[T], str] | None = None
) -> list[T]:
    """At most `limit` items, a `random.Random(seed)` sample kept in their order (all when None). With
    `group`, the sample first takes one item of each group (of as many groups as `limit` allows), so a
    group of one or two items (a source with one test document) is not left out by chance."""
    if limit is not None and limit < 1:
        raise FidelError(f"limit must be a positive number of examples, got {limit}")
    if limit is None or len(items) <= limit:
        return list(items)
    rng = random.Random(seed)
    chosen: set[int] = set()
    if group is not None:
        members: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            members.setdefault(group(item), []).append(index)
        names = sorted(members)
        chosen = {rng.choice(members[name]) for name in rng.sample(names, min(limit, len(names)))}
    rest = [index for index in range(len(items)) if index not in chosen]
    chosen.update(rng.sample(rest, limit - len(chosen)))
    return [items[index] for index in sorted(chosen)]
