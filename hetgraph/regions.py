"""Trace each decoder layer variant once: dynamo's region reuse, inlined again before the passes.

dynamo interprets the bytecode of every decoder layer it meets, so tracing time grows with the layer
count even where the layers are copies of a few variants. `torch.compiler.nested_compile_region`
lets it trace a region on its first call and, on a later call whose inputs match (its own reuse
checks: same tensor metadata and constants, and the region's guards re-evaluated with the sources
remapped to the new layer; torch/_dynamo/variables/invoke_subgraph.py), stamp out the traced
subgraph instead. Its inputs must be tensors, constants or modules; a transformers `Cache` is none of
these, so the stock layer forward cannot be that region as it is.

So each decoder layer of a hetgraph-built model gets its own `forward` (bound to that instance; no
transformers class is changed) that, while dynamo traces for a hetgraph backend, calls the stock
forward inside one region, passing the layer's cache tensors explicitly: inside, a
`_LayerCacheView` gives the stock attention the `update` / `get_seq_length` of hetgraph's cache
layers on those tensors (its in-place writes are the region's input mutations).
The cache layer's Python state (`holds_tokens`) is set by the caller, outside the region.

Which calls may reuse a trace is dynamo's decision, by its guards, not a key hetgraph computes
(`reuse_hash_fn` would skip those checks): a layer whose module differs in anything its code reads
(a norm's eps set after the build, say) is traced again, not served another layer's subgraph.

A hetgraph backend then inlines every region call (`inline_regions`), with each copied node's
module path rewritten to its own layer, so the passes see the graph they would have seen without
regions and `group_layer_variants` still proves, by comparing code, which layers may share a
subgraph. Any other backend traces the layers as before (`_backend_inlines_regions`), and so do
calls the region cannot take: export, gradients (training), a cache that is not `make_cache`'s,
mamba blocks, layers with every block removed, arguments other than the stock ones.

A region must trace whole: dynamo turns a graph break inside one into an error
(`UncapturedHigherOrderOpError`), where outside it would split the graph. The stock layers of the
seven families trace whole with hetgraph's attention implementations and transformers' default
experts implementation (`grouped_mm`); a layer that would break (e.g. `experts_implementation=
"eager"`, whose expert loop is data-dependent) is traced as a plain module after
`regions.disable(layers)`.

Pitfall (torch 2.13): a layer reached through a function's defaults or closure, not as the bound
`self`, is stamped out with the *first* layer's parameters on every later call (wrong logits, no
error); hence `types.MethodType`.
"""

from __future__ import annotations

import dataclasses
import operator
import types

import torch
import torch.fx as fx
from transformers.cache_utils import DummyLayer

from hetgraph.attention import LayerInputs
from hetgraph.cache import HeteroCache, StaticFullLayer, StaticWindowLayer
from hetgraph.passes._graph import eliminate_dead_code, layer_index_from_path, with_layer_index
from hetgraph.spec import FULL, LINEAR, LayerSpec

INLINES_REGIONS = "hetgraph_inlines_regions"  # attribute of a backend that calls `inline_regions`
INVOKE = torch.ops.higher_order.invoke_subgraph
# What the stock decoder layers are called with (all seven families), besides the hidden states.
_KNOWN_KWARGS = ("attention_mask", "position_ids", "cache", "use_cache", "position_embeddings", "output_router_logits")


def install(layers, spec) -> None:
    """Give each decoder layer the forward that picks its own mask and RoPE (`attention.LayerInputs`)
    and, while dynamo traces, calls the region of its variant.

    Not mamba blocks (their cache is not a key/value pair) nor layers whose blocks are all removed: a
    region must not return its input (dynamo refuses input-output aliasing in a higher-order op)."""
    for s, layer in zip(spec, layers):
        layer.forward = types.MethodType(_forward, layer)
        layer.hetgraph_inputs = LayerInputs.of(s)
        layer.hetgraph_layer_index = s.index
        layer.hetgraph_region = s.mamba != FULL and (s.attention in (FULL, LINEAR) or s.mlp in (FULL, LINEAR))
        layer.hetgraph_region_call = _region_of(s)
        routed = [m for m in layer.modules() if "_kernel_funcs" in vars(m) and hasattr(type(m).forward, "__wrapped__")]
        for module in routed:
            module.forward = types.MethodType(_forward_without_kernel_routing, module)
        layer.hetgraph_kernel_routed = routed


def disable(layers) -> None:
    """Trace these layers as plain modules again (e.g. once their weights are DTensors)."""
    for layer in layers:
        layer.hetgraph_region = False


def _forward(self, hidden_states, *args, **kwargs):
    # Written for dynamo, which interprets it at every layer call: plain loops, no generators (each
    # step here costs tracing time per layer, not per variant).
    self.hetgraph_inputs.pick(kwargs, hidden_states.device)
    stock = type(self).forward
    if args or not self.hetgraph_region or not torch.compiler.is_compiling():
        return stock(self, hidden_states, *args, **kwargs)
    if torch.compiler.is_exporting() or torch.is_grad_enabled() or not _backend_inlines_regions():
        return stock(self, hidden_states, *args, **kwargs)
    for k, v in kwargs.items():
        if v is not None and k not in _KNOWN_KWARGS:
            return stock(self, hidden_states, *args, **kwargs)
    if kwargs.get("output_router_logits"):  # GptOss passes it down; recording router logits is a side effect
        return stock(self, hidden_states, *args, **kwargs)
    rope = kwargs.get("position_embeddings")
    if not (rope is None or isinstance(rope, torch.Tensor) or (isinstance(rope, tuple) and len(rope) == 2)):
        return stock(self, hidden_states, *args, **kwargs)
    cache, layer, state = kwargs.get("cache"), None, (None,) * 6
    if cache is not None:
        if not isinstance(cache, HeteroCache):
            return stock(self, hidden_states, *args, **kwargs)
        layer = cache.layers[self.hetgraph_layer_index]
        if isinstance(layer, (StaticFullLayer, StaticWindowLayer)):
            too_long = hidden_states.shape[-2] > layer.max_cache_len
            if isinstance(layer, StaticFullLayer) and not layer.holds_tokens and too_long:
                return stock(self, hidden_states, *args, **kwargs)  # its own error, naming the layer
            state = _LayerCacheView.state_of(layer)
        elif not isinstance(layer, DummyLayer):  # a mamba layer's conv and recurrent states
            return stock(self, hidden_states, *args, **kwargs)
    # Flat arguments (the module, tensors, constants): dynamo then fingerprints them without a pytree
    # flatten, which cost about as much as tracing the layer (0.15 s a call).
    given = ",".join([k for k in _KNOWN_KWARGS if k in kwargs and (k != "cache" or layer is not None)])
    form = "pair" if isinstance(rope, tuple) else "one"
    # A constant of the call, so that a layer with a kernel chosen by `kernels.kernelize` is not
    # stamped out from a trace of a layer without (dynamo's reuse checks miss that difference).
    if _kernel_chosen(self.hetgraph_kernel_routed):
        form += ",kernels"
    rope_a, rope_b = rope if isinstance(rope, tuple) else (rope, None)
    out = self.hetgraph_region_call(
        self, hidden_states, given, form, kwargs.get("attention_mask"), kwargs.get("position_ids"),
        kwargs.get("use_cache"), kwargs.get("output_router_logits"), rope_a, rope_b, *state,
    )  # fmt: skip
    if state[3] is not None:  # the layer's keys: it was updated
        layer.holds_tokens = True  # what the layer's own `update` does (outside the region: Python state)
    return out


def _forward_without_kernel_routing(self, *args, **kwargs):
    """A `kernels.use_kernelized_func` module's forward (transformers 5.25 decorates the stock
    attention classes with it), without the routing while compiling when nothing is kernelized.

    The decorator's forward sets and resets a global (`_ACTIVE_KERNEL_FUNCS`) around the stock
    forward, so that the functions it names (`apply_rotary_pos_emb`) may run a hub kernel chosen by
    `kernels.kernelize`. dynamo records those writes as the region's side effects and refuses to
    reuse its trace: every layer was traced again. Compiling, with no kernel chosen (no `forward`
    bound on the module's kernel functions), the routing ends in the stock function anyway."""
    routed = type(self).forward
    if torch.compiler.is_compiling() and not _kernel_chosen((self,)):
        return routed.__wrapped__(self, *args, **kwargs)
    return routed(self, *args, **kwargs)


def _kernel_chosen(routed_modules) -> bool:
    """Whether any kernel function of these modules has a forward other than its class's own
    (`kernelize` binds another on it); read the way the decorator itself reads it while compiling."""
    for module in routed_modules:
        for f in module._kernel_funcs.values():
            if f.forward.__func__ is not type(f).forward:
                return True
    return False


def _call_stock_forward(layer, hidden_states, given, form, attention_mask, position_ids, use_cache, router_logits,
                        rope_a, rope_b, *state):  # fmt: skip
    values = {
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": use_cache,
        "output_router_logits": router_logits,
        "position_embeddings": (rope_a, rope_b) if form.startswith("pair") else rope_a,
        "cache": None if state[3] is None else _LayerCacheView(*state),  # state[3]: the keys
    }
    return type(layer).forward(layer, hidden_states, **{k: values[k] for k in given.split(",") if k})


# One region function per layer variant, each its own code object: dynamo keeps its reuse entries per
# code object and checks a call against them in turn, and an entry of another variant fails only in
# its guards, after the costliest part of the check (the sources of everything the trace read,
# rebuilt for the new layer). The window is left out of the key: it reaches the traced code only
# through the mask and the cache layer, which are region inputs compared before anything else (so
# sliding and full layers without a cache share a trace). Which calls reuse a trace is still decided
# by dynamo's checks: the key only sorts the entries. Each function keeps one entry per distinct
# trace (prefill or decode, with or without a cache, a layer traced again) and raises past
# `max_reuse_entries`.
_REGIONS: dict[tuple, object] = {}


def _region_of(spec: LayerSpec):
    key = dataclasses.replace(spec, sliding_window=None, attention_chunk_size=None).variant_key
    if key not in _REGIONS:
        name = f"_layer_variant_{len(_REGIONS)}"
        code = _call_stock_forward.__code__.replace(co_name=name, co_qualname=name)
        fn = types.FunctionType(code, _call_stock_forward.__globals__, name)
        _REGIONS[key] = torch.compiler.nested_compile_region(fn, max_reuse_entries=1 << 16)
    return _REGIONS[key]


class _LayerCacheView:
    """One hetgraph cache layer rebuilt from its tensors inside the region, as the attention uses
    it: `update` writes the layer's own tensors in place (its code, not a copy of it)."""

    @staticmethod
    def state_of(layer) -> tuple:
        """The layer as the region's arguments: constants, then its three tensors."""
        window = layer.window if isinstance(layer, StaticWindowLayer) else None
        return (window, layer.max_cache_len, layer.holds_tokens, layer.keys, layer.values, layer.cumulative_length)

    def __init__(self, window, max_cache_len, holds_tokens, keys, values, cumulative_length):
        cls = StaticFullLayer if window is None else StaticWindowLayer
        layer = cls.__new__(cls)
        layer.keys, layer.values, layer.cumulative_length = keys, values, cumulative_length
        layer.max_cache_len, layer.holds_tokens, layer.is_initialized = max_cache_len, holds_tokens, True
        layer.device, layer.dtype = keys.device, keys.dtype
        if window is not None:
            layer.window = window
        self.layer = layer

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.layer.update(key_states, value_states)

    def get_seq_length(self, layer_idx=0) -> int:
        return self.layer.get_seq_length()


@torch._dynamo.assume_constant_result
def _backend_inlines_regions() -> bool:
    """Whether the graph dynamo is tracing goes to a backend that inlines the regions (a constant
    of the trace, read from dynamo's output graph)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    fn = getattr(getattr(tx, "output", None), "compiler_fn", None)
    for _ in range(8):  # dynamo's wrappers (debug, options), then the backend itself
        if fn is None:
            return False
        if getattr(fn, INLINES_REGIONS, False):
            return True
        fn = getattr(fn, "compiler_fn", None) or getattr(fn, "__wrapped__", None)
    return False


def inline_regions(gm: fx.GraphModule) -> int:
    """Inline every `invoke_subgraph` call of `gm` in place (a user's own regions too: which layers
    share compiled code is `group_layer_variants`' decision), each copied node's module path naming
    the layer of its call, and drop the dead nodes regions leave; returns the number of calls inlined."""
    calls = list(gm.graph.find_nodes(op="call_function", target=INVOKE))
    bodies = {call.args[0].target for call in calls}
    for call in calls:
        body = getattr(gm, call.args[0].target)
        layer = _call_layer(call)
        env = dict(zip(body.graph.find_nodes(op="placeholder"), call.args[2:]))
        with gm.graph.inserting_before(call):
            for node in body.graph.nodes:
                if node.op in ("placeholder", "output"):
                    continue
                env[node] = new = gm.graph.node_copy(node, lambda n: env[n])
                if node.op == "get_attr":  # a constant of the body: give it a name on gm
                    new.target = _unique_name(gm, f"{call.args[0].target}_{node.target}")
                    setattr(gm, new.target, getattr(body, node.target))
                stack = node.meta.get("nn_module_stack")
                if layer is not None and stack:
                    new.meta["nn_module_stack"] = {k: (with_layer_index(p, layer), c) for k, (p, c) in stack.items()}
        outputs = body.graph.output_node().args[0]
        for user in list(call.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(env[outputs[user.args[1]]])
                gm.graph.erase_node(user)
        gm.graph.erase_node(call)
    for name in bodies:
        for node in list(gm.graph.find_nodes(op="get_attr", target=name)):
            if not node.users:
                gm.graph.erase_node(node)
        if not any(n.op == "get_attr" and n.target == name for n in gm.graph.nodes):
            delattr(gm, name)
    # A region's body keeps what its trace computed and did not use (the unused item of a tuple a
    # layer unpacks, `max(...).values`' indices), which dynamo drops from a graph without regions; so
    # must this, and for the regions dynamo inlined itself (a variant called once): else the first
    # pass to clean up reports them as its own removals.
    nodes = len(gm.graph.nodes)
    eliminate_dead_code(gm.graph)
    if calls or len(gm.graph.nodes) != nodes:
        gm.recompile()
    return len(calls)


def _unique_name(gm: fx.GraphModule, name: str) -> str:
    name, k = name.replace(".", "_"), 0
    while hasattr(gm, f"{name}_{k}"):
        k += 1
    return f"{name}_{k}"


def _call_layer(call: fx.Node) -> int | None:
    """The layer a region call was made for: the innermost module of its path naming a layer."""
    for path, _ in reversed(list((call.meta.get("nn_module_stack") or {}).values())):
        if (i := layer_index_from_path(path)) is not None:
            return i
    return None
