"""The model <-> compiler contract: how a hetgraph-built model carries its LayerSpec table, and how
the backend reads it back from the graph dynamo hands it.

A model carries its table twice: as the attribute `hetgraph_spec` on the model (what `make_cache`,
`export` and `inspect` read), and as tags on each parameter (`_hetgraph_spec`, and
`_hetgraph_layer` on a decoder layer's own parameters). The tags are the only route into a
backend: dynamo passes a compiler the graph and its inputs (the parameters among them), never the
module. Anything that replaces parameters drops the tags; `load_state_dict(assign=True)` and
`Module.to` are covered (a post-hook re-tags, `to` keeps the Parameter objects), others (tensor
subclass weights, FSDP/DTensor) are not, and the backend then warns instead of silently compiling
the unspecialized graph.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.fx as fx

from hetgraph.passes import PassContext
from hetgraph.spec import ModelSpec

logger = logging.getLogger(__name__)

SPEC_ATTR = "hetgraph_spec"  # attribute on the model
SPEC_TAG = "_hetgraph_spec"  # attribute on each parameter of a hetgraph-built model
LAYER_TAG = "_hetgraph_layer"  # attribute on each parameter of a decoder layer
# The runtime hooks every hetgraph-built model runs (`hetgraph.attention`): their frames in a
# graph's stack traces say the graph came from such a model, tags or not.
_HOOKS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention.py")
LOST_TABLE = (
    "hetgraph: this graph comes from a hetgraph-built model whose parameters no longer carry its "
    "LayerSpec table (they were replaced after the model was built: tensor-subclass weights, FSDP/DTensor, "
    "or a module swap); compiling it as plain Inductor would, without hetgraph's passes. Compile the "
    "model before replacing its parameters, or call hetgraph.contract.attach(model) again afterwards"
)


def attach(model: torch.nn.Module, spec: ModelSpec | None = None) -> None:
    """Give `model` its table: the model attribute, each parameter's tags, and the re-tagging hook.

    With `spec` None, re-tags a model that already has its attribute (after replacing parameters).
    """
    spec = spec or model_spec(model)
    first = getattr(model, SPEC_ATTR, None) is None
    setattr(model, SPEC_ATTR, spec)
    _tag(model, spec)
    if first:
        # `load_state_dict(assign=True)` replaces the parameters, and with them the tags.
        model.register_load_state_dict_post_hook(_retag)


def _retag(model: torch.nn.Module, _incompatible_keys) -> None:
    _tag(model, model_spec(model))


def _tag(model: torch.nn.Module, spec: ModelSpec) -> None:
    for param in model.parameters():
        setattr(param, SPEC_TAG, spec)
    layers = getattr(model, spec.adapter.base_model_attr).layers
    for i, layer in enumerate(layers):
        for param in layer.parameters():
            setattr(param, LAYER_TAG, i)


def model_spec(model: torch.nn.Module) -> ModelSpec:
    """The table of a hetgraph-built model; TypeError for any other model."""
    spec = getattr(model, SPEC_ATTR, None)
    if spec is None:
        raise TypeError(
            f"{type(model).__name__} was not built by hetgraph (hetgraph.from_config / hetgraph.from_pretrained)"
        )
    return spec


def context_from_inputs(gm: fx.GraphModule, example_inputs) -> PassContext:
    """What the passes may know about a dynamo graph: the table and parameter layers from the tags on
    its inputs, and whether it will be differentiated. Warns when the tags are lost (see module doc)."""
    spec: ModelSpec | None = None
    input_layers = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        spec = spec or getattr(example, SPEC_TAG, None)
        layer = getattr(example, LAYER_TAG, None)
        if layer is not None:
            input_layers[node.name] = layer
    if spec is None and _from_hetgraph_model(gm):
        logger.warning(LOST_TABLE)
    # What AOT autograd itself checks to decide whether to build a joint forward-backward graph.
    needs_grad = torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in example_inputs)
    return PassContext(spec=spec, input_layers=input_layers, needs_grad=needs_grad)


def _from_hetgraph_model(gm: fx.GraphModule) -> bool:
    return any(_HOOKS_FILE in (n.meta.get("stack_trace") or "") for n in gm.graph.nodes)
