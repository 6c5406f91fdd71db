"""The exact min-max contiguous partition of a sequence of costs (pipeline stages, device maps).

`split_layers` finds the contiguous split whose most expensive part is as cheap as possible (a
dynamic program over prefix sums, O(parts * n^2): instant for any real depth), optionally under a
per-part memory cap. Pure Python: `hetgraph.distributed` splits pipeline stages with it, and
`hetgraph.placement` splits decoder layers over devices.
"""

from __future__ import annotations

import math
from itertools import accumulate
from typing import Sequence


def split_layers(
    costs: Sequence[float],
    num_stages: int,
    *,
    first: float = 0.0,
    last: float = 0.0,
    memory: Sequence[float] | None = None,
    memory_cap: float | None = None,
) -> list[range]:
    """Contiguous layer ranges, one per stage, minimizing the largest stage cost.

    `first` / `last` are costs only the first / last stage carries (embedding; final norm and head).
    With `memory` (per layer, e.g. weight plus KV bytes) and `memory_cap`, every stage holds at most
    `memory_cap`; an impossible cap is an error naming the smallest one that works. Every stage gets
    at least one layer. Among equally good splits the one with the earliest cuts is returned.
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"split_layers: num_stages={num_stages}; allowed: 1 to the layer count, {n}")
    if any(not math.isfinite(c) or c < 0 for c in costs):
        raise ValueError(f"split_layers: costs must be finite and >= 0; got {list(costs)}")
    if (memory is None) != (memory_cap is None):
        raise ValueError("split_layers: memory and memory_cap go together")
    if memory is not None and len(memory) != n:
        raise ValueError(f"split_layers: {len(memory)} memory entries for {n} layers")
    cost = [0.0, *accumulate(costs)]
    held = [0.0, *accumulate(memory)] if memory is not None else None

    def stage(i: int, j: int, k: int) -> float:
        """Cost of layers [i, j) as stage k of num_stages; inf where it breaks the memory cap."""
        if held is not None and held[j] - held[i] > memory_cap:
            return math.inf
        return cost[j] - cost[i] + (first if k == 0 else 0.0) + (last if k == num_stages - 1 else 0.0)

    # best[k][j]: the smallest bottleneck of layers [0, j) as stages 0..k; cut[k][j]: where stage k starts.
    best = [[math.inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = stage(0, j, 0)
    for k in range(1, num_stages):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                value = max(best[k - 1][i], stage(i, j, k))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    if math.isinf(best[-1][n]):
        needed = _smallest_cap(memory, num_stages)
        raise ValueError(f"split_layers: no split into {num_stages} stages keeps each stage within memory_cap="
                         f"{memory_cap:g}; the smallest cap that works is {needed:g}")  # fmt: skip
    ranges, j = [], n
    for k in range(num_stages - 1, -1, -1):
        i = cut[k][j] if k else 0
        ranges.append(range(i, j))
        j = i
    return ranges[::-1]


def _smallest_cap(memory: Sequence[float], num_stages: int) -> float:
    """The smallest per-stage memory cap any contiguous split into num_stages stages meets."""
    ranges = split_layers(memory, num_stages)
    return max(sum(memory[i] for i in r) for r in ranges)
