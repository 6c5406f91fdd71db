"""Cutting a model from its parent's tensors: the per-layer plan decides the shapes, an importance
criterion which channels and heads stay (`from_pretrained(path, per_layer_config=..., prune=...)`).

Per layer, parent LayerSpec -> child LayerSpec:

* a block the child removes: its tensors are not read;
* an MLP narrowed to I' channels: rows of gate/up and columns of down, the same I' channels;
* fewer query heads H' and KV heads Hk' (same head_dim): whole KV groups are kept (k/v rows of
  Hk' KV heads) and, inside each, H'/Hk' of its query heads (q rows, o columns). So a query head
  keeps the keys it was trained with; a plan that puts more query heads on a KV head than the
  parent did cannot be met by slicing, and is an error;
* windows and chunks change no tensor.

Anything else a plan asks of the weights (a block the parent lacks, a linear map the parent never
had, another head_dim, expert or mamba sizes) is an error naming the layer and the tensor.

`prune`: "first" keeps the first units; "magnitude" the largest by the L2 norm of each unit's
weights (LLM-Pruner's simplest criterion); a callable `prune(layer, group, weights) -> scores`
gets, for group "mlp" / "kv_heads" / "heads", the parent's weights with one unit per row of dim 0
(`{"gate_proj": [I, h], "up_proj": [I, h], "down_proj": [I, h]}`, `{"k_proj": [Hk, D*h], ...}`) and
returns one score per unit; the highest stay, in their original order.
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

import torch

from hetgraph.errors import HeteroConfigError
from hetgraph.spec import FULL, ModelSpec

Importance = Callable[[int, str, Mapping[str, torch.Tensor]], torch.Tensor]
Prune = Union[str, Importance]
PRUNE_RULES = ("first", "magnitude")
_LAYER = "{base}.layers.{i}."


def plan_config(parent: Mapping, plan: Mapping) -> dict:
    """The parent's config.json dict with `plan` (layer -> per-layer entries) merged over its own."""
    if not isinstance(plan, Mapping):
        raise HeteroConfigError(f"per_layer_config must map layer indices to entries, got {type(plan).__name__}")
    d = dict(parent)
    merged = {int(k): dict(v) for k, v in (d.get("per_layer_config") or {}).items()}
    for key, entry in plan.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise HeteroConfigError(f"per_layer_config key {key!r} is not a layer index") from None
        if not isinstance(entry, Mapping):
            raise HeteroConfigError(f"per_layer_config[{i}] must be a mapping of attributes, got {entry!r}")
        merged.setdefault(i, {}).update(entry)
    d["per_layer_config"] = merged
    return d


def cut_tensors(parent: ModelSpec, child: ModelSpec, expected: Mapping[str, tuple], load, prune: Prune):
    """(name, tensor) for every tensor of the child (`expected`: name -> shape), from `load(name)`
    of the parent's. The criterion and each layer's head_dim are checked here, before any tensor is
    read; what only the weights show raises HeteroConfigError while iterating."""
    _check_prune(prune)
    if len(parent) != len(child):
        raise HeteroConfigError(f"cut: the plan has {len(child)} layers, the parent {len(parent)}; cut keeps the depth")
    plans = [_LayerCut(parent[i], child[i], child.adapter, load, prune) for i in range(len(child))]
    return _tensors(plans, child.adapter.base_model_attr, expected, load)


def _tensors(plans, base: str, expected, load):
    for name, shape in expected.items():
        layer = _layer_of(name, base)
        tensor = plans[layer].tensor(name, tuple(shape)) if layer is not None else load(name)
        if tuple(tensor.shape) != tuple(shape):
            raise HeteroConfigError(f"cut: {name} is {list(tensor.shape)} in the parent, the plan needs {list(shape)}")
        yield name, tensor


def _check_prune(prune) -> None:
    if not (callable(prune) or prune in PRUNE_RULES):
        raise HeteroConfigError(f"prune={prune!r} is not a criterion; allowed: {list(PRUNE_RULES)} or a callable")


def _layer_of(name: str, base: str) -> int | None:
    head = f"{base}.layers."
    if not name.startswith(head):
        return None
    return int(name[len(head) :].split(".", 1)[0])


class _LayerCut:
    """One layer's selections, computed on first use from the parent's weights."""

    def __init__(self, parent, child, adapter, load, prune: Prune):
        self.parent, self.child, self.adapter, self.load, self.prune = parent, child, adapter, load, prune
        self.prefix = _LAYER.format(base=adapter.base_model_attr, i=child.index)
        self.where = f"layer {child.index}"
        self._rows: dict[str, torch.Tensor] = {}  # size attribute -> kept rows of dim 0 (or 1)
        if parent.has_attention and child.has_attention and child.head_dim != parent.head_dim:
            # checked up front: another head_dim can give the parent's very shapes (8 x 8 = 4 x 16)
            raise HeteroConfigError(
                f"cut: {self.where}: head_dim={child.head_dim} from a parent head_dim of {parent.head_dim}; "
                "cut keeps head_dim"
            )

    def tensor(self, name: str, shape: tuple) -> torch.Tensor:
        local = name[len(self.prefix) :]
        module, _, param = local.rpartition(".")
        module = module.rpartition(".")[2]
        self._check_blocks(local)
        tensor = self.load(name)
        if tuple(tensor.shape) == shape:
            return tensor
        projections = self.adapter.projections
        if module not in projections:
            raise HeteroConfigError(
                f"cut: {self.where}: {local} is {list(tensor.shape)} in the parent, the plan needs {list(shape)}; "
                f"cut narrows only {sorted(projections)} (MLP widths, heads)"
            )
        dim, attr = projections[module]
        dim = 0 if param != "weight" else dim  # a bias runs along the output rows
        return tensor.index_select(dim, self._kept(attr))

    def _check_blocks(self, local: str) -> None:
        for block in self.adapter.blocks:
            kind, child_kind = getattr(self.parent, block.name), getattr(self.child, block.name)
            if child_kind != kind and child_kind != "skip" and local.startswith(block.module + "."):
                raise HeteroConfigError(
                    f"cut: {self.where}: the plan makes the {block.name} block {child_kind!r} but the parent's is "
                    f"{kind!r}; cut can remove or narrow blocks, not create weights ({local})"
                )

    def _kept(self, attr: str) -> torch.Tensor:
        if attr not in self._rows:
            if attr == "intermediate_size":
                self._rows[attr] = self._mlp_rows()
            else:
                queries, kvs = self._head_rows()
                self._rows["query_size"], self._rows["key_value_size"] = queries, kvs
        return self._rows[attr]

    # -- MLP -------------------------------------------------------------------------------------------
    def _mlp_rows(self) -> torch.Tensor:
        width, keep = self.parent.intermediate_size, self.child.intermediate_size
        if self.parent.mlp != FULL or keep > width:
            raise HeteroConfigError(
                f"cut: {self.where}: intermediate_size={keep} from a parent MLP of {width}; cut only narrows"
            )
        weights = {m: self._weight("mlp." + m) for m in ("gate_proj", "up_proj")}
        weights["down_proj"] = self._weight("mlp.down_proj").T
        return self._select("mlp", weights, width, keep)

    # -- heads -----------------------------------------------------------------------------------------
    def _head_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        p, c = self.parent, self.child
        if p.attention != FULL:
            raise HeteroConfigError(f"cut: {self.where}: the parent has no attention weights to narrow")
        heads, kvs, dim = p.num_attention_heads, p.num_key_value_heads, p.head_dim
        keep_heads, keep_kvs = c.num_attention_heads, c.num_key_value_heads
        group, keep_group = heads // kvs, keep_heads // keep_kvs
        if keep_kvs > kvs or keep_heads > heads or keep_group > group:
            raise HeteroConfigError(
                f"cut: {self.where}: {keep_heads} query heads on {keep_kvs} KV heads ({keep_group} per KV head) from "
                f"a parent of {heads} on {kvs} ({group} per KV head); slicing keeps whole KV groups and drops query "
                f"heads within them, so allowed: at most {kvs} KV heads and at most {group} query heads per KV head"
            )
        q = self._weight("self_attn.q_proj").reshape(heads, dim, -1)
        o = self._weight("self_attn.o_proj").reshape(-1, heads, dim).transpose(0, 1)
        k = self._weight("self_attn.k_proj").reshape(kvs, dim, -1)
        v = self._weight("self_attn.v_proj").reshape(kvs, dim, -1)
        flat = dict(k_proj=k.flatten(1), v_proj=v.flatten(1),
                    q_proj=q.reshape(kvs, -1), o_proj=o.reshape(kvs, -1))  # fmt: skip
        kept_kvs = self._select("kv_heads", flat, kvs, keep_kvs)
        scores = self._scores("heads", dict(q_proj=q.flatten(1), o_proj=o.flatten(1)), heads)
        kept_heads = []
        for g in kept_kvs.tolist():  # inside each kept group, its best `keep_group` query heads
            members = torch.arange(g * group, (g + 1) * group)
            best = members[_top(scores[members], keep_group)]
            kept_heads.append(best)
        kept_heads = torch.cat(kept_heads)
        return _expand(kept_heads, dim), _expand(kept_kvs, dim)

    # -- shared ----------------------------------------------------------------------------------------
    def _weight(self, local: str) -> torch.Tensor:
        return self.load(self.prefix + local + ".weight").float()

    def _scores(self, group: str, weights: Mapping[str, torch.Tensor], units: int) -> torch.Tensor:
        if self.prune == "first":
            return -torch.arange(units, dtype=torch.float32)
        if self.prune == "magnitude":
            return torch.stack([w.float().reshape(units, -1).square().sum(1) for w in weights.values()]).sum(0)
        scores = torch.as_tensor(self.prune(self.child.index, group, dict(weights)))
        if scores.shape != (units,):
            raise HeteroConfigError(
                f"cut: {self.where}: prune({self.child.index}, {group!r}, ...) returned shape {list(scores.shape)}; "
                f"allowed: one score per unit, [{units}]"
            )
        return scores.float()

    def _select(self, group: str, weights, units: int, keep: int) -> torch.Tensor:
        return _top(self._scores(group, weights, units), keep)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in increasing order (ties: the earlier unit)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))[:keep]
    return torch.tensor(sorted(order), dtype=torch.long)


def _expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """Unit indices -> the rows they span, `size` rows each."""
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


# -- reading a pruned checkpoint whose config.json is still the parent's ------------------------------

# The LayerSpec attribute each projection's size gives, in units of head_dim or of one.
_SIZE_ATTRIBUTES = {"query_size": "num_attention_heads", "key_value_size": "num_key_value_heads",
                    "intermediate_size": "intermediate_size"}  # fmt: skip


def infer_plan(parent: ModelSpec, expected: Mapping[str, tuple], stored: Mapping[str, tuple]) -> dict:
    """Per-layer entries that explain `stored` (name -> shape) where it contradicts `expected`, the
    tensors of the config's own model: missing blocks -> "skip", a block's linear weight ->
    "linear", projection sizes -> heads (size / head_dim), KV heads, MLP width. Layers that match
    get no entry; what the shapes do not decide is an error naming the layer and tensor."""
    adapter = parent.adapter
    base = adapter.base_model_attr
    plan = {}
    for s in parent:
        prefix = _LAYER.format(base=base, i=s.index)
        want = {n[len(prefix) :]: tuple(v) for n, v in expected.items() if n.startswith(prefix)}
        got = {n[len(prefix) :]: tuple(v) for n, v in stored.items() if n.startswith(prefix)}
        if want == got:
            continue
        entry: dict = {}
        for block in adapter.blocks:
            own = lambda names: {n: names[n] for n in names if n.startswith((block.module + ".", block.norm + "."))}  # noqa: E731
            wanted, present = own(want), own(got)
            if not wanted or wanted == present:
                continue
            if not present:
                entry.setdefault("skip", []).append(block.name)
            elif block.linear_weight and f"{block.module}.{block.linear_weight}.weight" in present:
                entry.setdefault("linear", []).append(block.name)
            else:
                entry.update(_sizes(f"layer {s.index}", s, block.module, present, adapter.projections))
        if entry:
            plan[s.index] = entry
    return plan


def _sizes(where: str, s, module: str, present: Mapping[str, tuple], projections) -> dict:
    sizes: dict[str, int] = {}
    for name, (dim, attr) in projections.items():
        shape = present.get(f"{module}.{name}.weight")
        if shape is None:
            continue
        unit = 1 if attr == "intermediate_size" else s.head_dim
        size, other = shape[dim], _SIZE_ATTRIBUTES[attr]
        if unit is None or size % unit:
            raise HeteroConfigError(
                f"infer_shapes: {where}: {module}.{name}.weight is {list(shape)}: {size} is not a multiple of "
                f"head_dim={unit}; the shapes do not decide the heads, give per_layer_config for this layer"
            )
        if sizes.setdefault(other, size // unit) != size // unit:
            raise HeteroConfigError(
                f"infer_shapes: {where}: {module}.{name}.weight is {list(shape)}, which gives {other}="
                f"{size // unit}, but another projection of the block gives {sizes[other]}"
            )
    if not sizes:
        raise HeteroConfigError(
            f"infer_shapes: {where}: the {module} tensors {sorted(present)} differ from the config's and none is "
            f"a projection hetgraph reads sizes from ({sorted(projections)})"
        )
    return sizes
