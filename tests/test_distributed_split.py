"""`hetgraph.distributed.split_layers`: the exact min-max contiguous split (against brute force),
first/last-stage costs, the memory cap and its error; `layer_costs` from parameters and from a table."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import hetgraph
from hetgraph.distributed import layer_costs, pipeline_stage, split_layers
from support.models import hetero_config


def _brute_force(costs, k, first=0.0, last=0.0, memory=None, cap=None):
    """The smallest bottleneck over every contiguous split into k non-empty stages."""
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        stages = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        if memory is not None and any(sum(memory[i] for i in r) > cap for r in stages):
            continue
        worst = max(sum(costs[i] for i in r) + (first if s == 0 else 0) + (last if s == k - 1 else 0)
                    for s, r in enumerate(stages))  # fmt: skip
        best = min(best, worst)
    return best


def _bottleneck(ranges, costs, first=0.0, last=0.0):
    k = len(ranges)
    return max(sum(costs[i] for i in r) + (first if s == 0 else 0) + (last if s == k - 1 else 0)
               for s, r in enumerate(ranges))  # fmt: skip


def _check_partition(ranges, n, k):
    assert len(ranges) == k and ranges[0].start == 0 and ranges[-1].stop == n
    assert all(len(r) > 0 for r in ranges) and all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))


def test_split_is_the_exact_min_max_against_brute_force():
    rng = random.Random(0)
    for _ in range(150):
        n, k = rng.randint(1, 9), None
        k = rng.randint(1, n)
        costs = [rng.choice([0.0, rng.uniform(0, 10)]) for _ in range(n)]
        first, last = rng.choice([0.0, 3.0]), rng.choice([0.0, 5.0])
        ranges = split_layers(costs, k, first=first, last=last)
        _check_partition(ranges, n, k)
        assert _bottleneck(ranges, costs, first, last) == pytest.approx(_brute_force(costs, k, first, last))


def test_split_balances_where_an_even_count_does_not():
    costs = [4, 4, 4, 4, 1, 1, 1, 1]  # wide layers, then pruned ones
    assert split_layers(costs, 2) == [range(0, 2), range(2, 8)]  # 8 / 12, as good as 12 / 8 (an even split: 16 / 4)
    assert split_layers(costs, 2, last=10.0) == [range(0, 4), range(4, 8)]  # the head weighs on the last stage: 16 / 14


def test_memory_cap_is_kept_and_an_impossible_cap_names_the_smallest_that_works():
    rng = random.Random(1)
    for _ in range(60):
        n = rng.randint(2, 8)
        k = rng.randint(1, n)
        costs = [rng.uniform(0, 10) for _ in range(n)]
        memory = [rng.uniform(1, 5) for _ in range(n)]
        cap = rng.uniform(max(memory), sum(memory))
        expected = _brute_force(costs, k, memory=memory, cap=cap)
        if expected == float("inf"):
            with pytest.raises(ValueError, match="the smallest cap that works is"):
                split_layers(costs, k, memory=memory, memory_cap=cap)
            continue
        ranges = split_layers(costs, k, memory=memory, memory_cap=cap)
        _check_partition(ranges, n, k)
        assert all(sum(memory[i] for i in r) <= cap for r in ranges)
        assert _bottleneck(ranges, costs) == pytest.approx(expected)
    with pytest.raises(ValueError, match="memory_cap=3; the smallest cap that works is 4"):
        split_layers([1, 1, 1, 1], 2, memory=[2, 2, 2, 2], memory_cap=3)
    assert split_layers([1, 1, 1, 1], 2, memory=[2, 2, 2, 2], memory_cap=4) == [range(0, 2), range(2, 4)]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: split_layers([1, 2], 3), "num_stages=3; allowed: 1 to the layer count, 2"),
        (lambda: split_layers([1, -2], 1), "finite and >= 0"),
        (lambda: split_layers([1, 2], 1, memory=[1, 1]), "memory and memory_cap go together"),
        (lambda: split_layers([1, 2], 1, memory=[1], memory_cap=2), "1 memory entries for 2 layers"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_layer_costs_from_parameters_and_from_a_latency_table():
    torch.manual_seed(0)
    model = hetgraph.from_config(hetero_config("llama"))
    layers = model.model.layers
    by_bytes = layer_costs(model)
    assert by_bytes == [sum(p.numel() * 4 for p in layer.parameters()) for layer in layers]
    table = hetgraph.profile(model, prompt_len=8, context_len=8, backend="none", repeats=1)
    for j, row in enumerate(table.rows):  # known values in place of this machine's noisy times
        row.prefill_ms, row.decode_ms = float(j + 1), float(10 * (j + 1))
    spec = hetgraph.contract.model_spec(model)
    assert layer_costs(model, table, phase="prefill_ms") == [table.row(s).prefill_ms for s in spec]
    assert layer_costs(model, table) == [table.row(s).decode_ms for s in spec]
    table.rows[0].decode_ms = -0.5
    with pytest.raises(hetgraph.HeteroConfigError, match=r"layer 0: the table's decode_ms .* -0.5000 \(< 0: noise\)"):
        layer_costs(model, table)
    table.rows.pop()
    with pytest.raises(hetgraph.HeteroConfigError, match="is not in the latency table"):
        layer_costs(model, table, phase="prefill_ms")


def test_a_balanced_stage_from_a_checkpoint_splits_by_parameter_bytes(checkpoint):
    """The CLI's default (`--split balanced` from a path): costs from the checkpoint's shapes alone."""
    config = hetero_config("llama")
    path = checkpoint(config)
    expected = split_layers(layer_costs(hetgraph.from_pretrained(path)), 2)
    stages = [pipeline_stage(path, i, 2) for i in range(2)]
    assert [s.layers for s in stages] == expected
