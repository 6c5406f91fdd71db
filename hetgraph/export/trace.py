"""`torch.export.export` of a wrapper, then hetgraph's passes on the exported aten graph."""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx.traceback as fx_traceback
from torch import nn

from hetgraph.contract import model_spec
from hetgraph.export.plan import _plan
from hetgraph.passes import EXPORT, PassContext, PassRecord, run_passes
from hetgraph.passes.attribute_nodes import attribute_nodes

logger = logging.getLogger(__name__)


def specialize(ep: torch.export.ExportedProgram, spec) -> tuple[torch.export.ExportedProgram, list[PassRecord]]:
    """Run hetgraph's export passes on an exported program's graph; the specialized, valid program.

    Every pass but group_layer_variants: its shared submodules are not part of an ExportedProgram's
    signature. A pass may insert calls of Python functions (specialize_attention's forms);
    `run_decompositions({})` retraces the program, which inlines them as aten ops and decomposes
    nothing else; the nodes of the retraced program are tagged again (`hetgraph.export.listing`).
    """
    _, records = run_passes(ep.graph_module, PassContext(spec=spec), graph=EXPORT)
    for record in records:
        for layer, reason in record.refused.items():
            logger.info("hetgraph export %s: layer %s: %s", record.name, layer, reason)
    ep.graph_module.recompile()
    if any(n.op == "call_function" and not _is_op(n.target) for n in ep.graph.nodes):
        ep = ep.run_decompositions({})
        # The retrace keeps each node's module path but not hetgraph's tags: attribute them again.
        attribute_nodes(ep.graph_module, PassContext(spec=spec))
    ep.validate()
    return ep, records


def _is_op(target) -> bool:
    return isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) or target is operator.getitem


def _trace(model, wrapper: nn.Module, args: tuple, dynamic_shapes) -> tuple[torch.export.ExportedProgram, list]:
    # preserve_node_meta: the hook's mask annotations (node.meta["custom"]) reach the exported graph.
    with torch.no_grad(), fx_traceback.preserve_node_meta():
        ep = torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes, strict=False)
    return specialize(ep, model_spec(model))


def prefill_program(model: nn.Module, *, input_ids: torch.Tensor | None = None):
    """The specialized prefill program `(input_ids) -> logits`, in memory, and what each pass did."""
    (job,), _ = _plan(model, input_ids, False, None, None)
    return _trace(model, job.wrapper, job.args, job.dynamic_shapes)


def _prompt_range(ep: torch.export.ExportedProgram) -> tuple[int, int]:
    """The prompt lengths a prefill program accepts: symbolic over the export range, or the
    example's length where the program was traced static (mamba layers, see `_plan`)."""
    ids = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name.endswith("input_ids"))
    length = ids.meta["val"].shape[1]
    if isinstance(length, torch.SymInt) and length.node.expr.is_number:
        length = int(length.node.expr)
    if isinstance(length, int):
        return length, length
    bounds = ep.range_constraints[length.node.expr]
    # A symbolic size's range starts at 2 (export's 0/1 specialization); the program's own input
    # check and graph accept 1 as well (tests/test_export.py decodes 1-token prompts).
    lower = 1 if bounds.lower == 2 else int(bounds.lower)
    return lower, int(bounds.upper)
