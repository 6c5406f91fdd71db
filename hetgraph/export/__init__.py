"""Export the specialized graphs: torch.export programs (`.pt2`) and AOTInductor packages.

    hetgraph.export(model, "model.pt2", input_ids=ids)                 # the file model.pt2
    hetgraph.export(model, "out", input_ids=ids)                       # out/prefill.pt2
    hetgraph.export(model, "out", decode=True, batch_size=1, max_cache_len=256)  # + out/decode.pt2
    hetgraph.export(model, "out", package=True)                        # + out/prefill.aoti.pt2

A path ending in `.pt2` is the one file written, the prefill program without decode
(`torch.export.load("model.pt2")`; with `package=True` also `model.aoti.pt2` next to it); any other
path is a directory holding one file per program. Each program is `torch.export.export` of a small
wrapper around the model (hooks included, so the per-window masks and per-head-dim RoPE are traced
in), then hetgraph's passes run on the exported aten graph: removed blocks leave no op, one mask per
distinct window. The programs are plain torch: `torch.export.load(path).module()` runs them in a
process that never imports hetgraph, and refuses inputs of other shapes with torch's message naming
the expected and the given size. `hetgraph.runtime` (torch only) loads them, reads their metadata
and runs the greedy loop.

Programs (B is fixed at export; T may be 1 .. the export's maximum prompt length; with mamba
layers (NemotronH) the prefill serves exactly the example prompt's length, which the metadata's
`min_prompt_len` / `max_prompt_len` say):

* `prefill.pt2` without `decode`: `(input_ids[B, T]) -> logits[B, T, V]`.
* with `decode=True`, the cache is explicit state, a dict of tensors the caller holds:
  `prefill.pt2`: `(input_ids[B, T]) -> (logits[B, T, V], state)`, where `state` is a fresh cache
  filled with the prompt: per attention layer i, `layers.{i}.keys` / `layers.{i}.values`
  `[B, kv_heads_i, min(window_i, max_cache_len), head_dim_i]` and `layers.{i}.length` (an int64
  scalar, the tokens seen); per mamba layer i (NemotronH), `layers.{i}.conv_states`
  `[B, conv_dim_i, conv_kernel]` and `layers.{i}.recurrent_states` `[B, heads_i, head_dim_i, state]`
  (fp32); the same layout as `hetgraph.make_cache`.
  `decode.pt2`: `(input_ids[B, 1], state) -> logits[B, 1, V]`; it updates `state` in place.
  `generate_with_exported` is the greedy loop over the two. Prompts in a batch share one length
  (no padding mask).

AOTInductor packages specialize on input strides (pass contiguous int64 `input_ids`) and check
input shapes only with `AOTI_RUNTIME_CHECK_INPUTS=1` in the environment; `.pt2` programs always do.

Stages, one module each: `wrappers` (the traced nn.Modules), `plan` (the request checked, what to
trace), `trace` (torch.export + passes), `write` (files), `listing` (per-layer op counts).
"""

from __future__ import annotations

import inspect
import sys
import types

from hetgraph.export.listing import describe_graph, layer_ops
from hetgraph.export.trace import prefill_program, specialize
from hetgraph.export.write import Exported, export
from hetgraph.runtime import FORMAT_VERSION, METADATA, generate_with_exported, load, read_metadata

__all__ = [
    "export",
    "Exported",
    "generate_with_exported",
    "read_metadata",
    "load",
    "METADATA",
    "FORMAT_VERSION",
    "prefill_program",
    "specialize",
    "describe_graph",
    "layer_ops",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> Exported:
        return export(*args, **kwargs)


# `hetgraph.export` is both this module (`hetgraph.export.read_metadata`) and the function
# (`hetgraph.export(model, path)`): a module subclass may define __call__ (Python data model,
# "Customizing module attribute access").
sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(export)  # what `help` and IDEs show for `hetgraph.export(...)`
