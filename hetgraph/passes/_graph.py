"""Small FX helpers shared by the passes: op matching, layer tags, safe dead-code elimination."""

from __future__ import annotations

import functools
import hashlib
import inspect
import operator
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

TAG = "hetgraph"  # node.meta key holding a NodeTag

ZEROS_LIKE = {torch.zeros_like, aten.zeros_like.default}
ADD = {operator.add, torch.add, aten.add.Tensor, operator.iadd}
SDPA = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}
LINEAR = {torch._C._nn.linear, aten.linear.default}
VIEW_METHODS = {"view", "reshape"}
VIEW_FUNCTIONS = {torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default}

_LAYER_RE = re.compile(r"layers(?:\[|\.)(\d+)")


@dataclass(frozen=True)
class NodeTag:
    layer: int | None  # decoder layer index, None for inter-layer glue
    block: str | None  # "attention" / "mlp" for a block's own ops, None for the layer's residual glue
    module_type: str | None  # the innermost module's class name
    module_name: str | None = None  # the innermost module's attribute name, e.g. "q_proj"


def tag(node: fx.Node) -> NodeTag | None:
    return node.meta.get(TAG)


def layer_of(node: fx.Node) -> int | None:
    t = tag(node)
    return None if t is None else t.layer


def is_op(node: fx.Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def is_view(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in VIEW_METHODS) or is_op(node, VIEW_FUNCTIONS)


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    return getattr(target, "__name__", None) or str(target)


def compute_nodes(gm: fx.GraphModule):
    return (n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))


def ops_per_layer(gm: fx.GraphModule) -> Counter:
    """Number of compute nodes per layer index (None: glue outside layers)."""
    return Counter(layer_of(n) for n in compute_nodes(gm))


def value(node) -> torch.Tensor | None:
    """The (fake) example value dynamo or export recorded for a node."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def same_tensor_type(a, b) -> bool:
    va, vb = value(a), value(b)
    return va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype


def _is_impure(node: fx.Node) -> bool:
    # FX treats every call_method as pure; in-place methods (cache writes) are not.
    if node.op == "call_method" and isinstance(node.target, str):
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function" and getattr(node.target, "__name__", "").endswith("_"):
        return True
    return node.is_impure()


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Drop pure nodes nobody reads. Not `Graph.eliminate_dead_code`: it recurses into subgraph
    modules with FX's own purity rule, which would drop their cache writes."""
    for node in reversed(graph.nodes):
        if not node.users and not _is_impure(node):
            graph.erase_node(node)


def finish(gm: fx.GraphModule) -> None:
    """After a change: drop dead pure nodes, lint, recompile."""
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()


def layer_index_from_path(path: str) -> int | None:
    matches = _LAYER_RE.findall(path)
    return int(matches[-1]) if matches else None


def with_layer_index(path: str, layer: int) -> str:
    """The module path with its (last) layer index replaced: "...layers.0.mlp" -> "...layers.5.mlp"."""
    matches = list(_LAYER_RE.finditer(path))
    if not matches:
        return path
    m = matches[-1]
    return path[: m.start(1)] + str(layer) + path[m.end(1) :]


@functools.cache
def wrapped_meta(module) -> dict:
    """node.meta that lets AOTAutograd's cache take a node calling a Python function of `module`
    (a pass's forms): torch's hook for `fx.wrap` functions, the module's source hash in the key."""
    return {"is_wrapped": True, "user_cache_hash": hashlib.sha256(inspect.getsource(module).encode()).hexdigest()}
