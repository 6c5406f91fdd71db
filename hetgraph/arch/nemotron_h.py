"""NemotronH: hybrid blocks, each one norm + ONE mixer (mamba2, attention, MLP or MoE) + residual.

The block type comes from the global `layers_block_type` (alias `layer_types`). Removing a
block's mixer (`skip: ["mixer"]`, or the name of its type: `attention` on attention blocks, `mlp`
on MLP and MoE blocks, `mamba` on mamba blocks) leaves only the residual, so the whole block
becomes the identity, its norm included. Attention is NoPE (no rotary embedding).

The stock `_init_weights` sizes the mamba `A_log` / `dt_bias` from the *global* `mamba_num_heads`,
which raises (or mis-sizes) when it varies per layer: `init_mamba` does the same per layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from hetgraph.arch import Block, FamilyAdapter


@torch.no_grad()
def init_mamba(layer, layer_config) -> None:
    """Initialise a mamba mixer's A_log, D and dt_bias as the stock `_init_weights` does, from its own config."""
    mixer = getattr(layer, "mixer", None)
    if getattr(layer, "block_type", None) != "linear_attention" or not hasattr(mixer, "A_log"):
        return
    heads = mixer.num_heads
    mixer.A_log.copy_(torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
    mixer.D.fill_(1.0)
    lo, hi = math.log(layer_config.time_step_min), math.log(layer_config.time_step_max)
    dt = torch.exp(torch.rand(heads) * (hi - lo) + lo).clamp(min=layer_config.time_step_floor)
    mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
    for param in (mixer.A_log, mixer.D, mixer.dt_bias):
        param._is_hf_initialized = True


_EXPERT = re.compile(r"(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight")


@dataclass
class _StackedIndex:
    """A checkpoint index (as `hetgraph.checkpoint.TensorIndex`) under the model's names; a name may
    stand for several stored tensors, stacked on a new dim 0."""

    files: dict[str, str]  # model name -> file (of its first part)
    shapes: dict[str, tuple[int, ...]]
    parts: dict[str, list[str]] = field(default_factory=dict)  # model name -> stored names, in order
    stored_files: dict[str, str] = field(default_factory=dict)  # stored name -> file
    stacked: set[str] = field(default_factory=set)

    @property
    def stored(self) -> dict[str, str]:
        """Model name -> the stored name of its (first) part, as `RenamedIndex.stored`."""
        return {name: parts[0] for name, parts in self.parts.items()}

    def load(self, name: str) -> torch.Tensor:
        from hetgraph.checkpoint import TensorIndex  # checkpoint imports spec, which imports arch

        tensors = [TensorIndex(self.stored_files, {}).load(stored) for stored in self.parts[name]]
        return torch.stack(tensors) if name in self.stacked else tensors[0]


def checkpoint_index(index):
    """NemotronH's stored layout (real checkpoints, and transformers' own `save_pretrained`) under the model's names.

    Stored: `backbone.` for `model.`, and one `mixer.experts.{e}.{up,down}_proj.weight` per expert;
    the model holds `mixer.experts.{up,down}_proj` of shape [experts, ...] (transformers merges them
    the same way when it loads). Experts are stacked only when they are numbered 0..E-1 with one
    shape; anything else keeps its stored name, and the strict check then reports it.
    """
    parts: dict[str, list[str]] = {}
    stacked: set[str] = set()
    experts: dict[str, dict[int, str]] = {}
    for stored in index.shapes:
        name = "model." + stored[len("backbone.") :] if stored.startswith("backbone.") else stored
        m = _EXPERT.fullmatch(name)
        if m:
            experts.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = stored
        else:
            parts[name] = [stored]
    shapes = {name: index.shapes[stored[0]] for name, stored in parts.items()}
    for name, by_expert in experts.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        if sorted(by_expert) == list(range(len(by_expert))) and len({index.shapes[s] for s in ordered}) == 1:
            parts[name] = ordered
            shapes[name] = (len(ordered), *index.shapes[ordered[0]])
            stacked.add(name)
        else:
            for stored in ordered:
                parts[stored] = [stored]
                shapes[stored] = index.shapes[stored]
    files = {name: index.files[stored[0]] for name, stored in parts.items()}
    stored_files = {s: index.files[s] for s in index.shapes}
    return _StackedIndex(files, shapes, parts=parts, stored_files=stored_files, stacked=stacked)


NEMOTRON_H = FamilyAdapter(
    name="nemotron_h",
    model_types=("nemotron_h",),
    causal_lm="NemotronHForCausalLM",
    base_model_attr="model",
    decoder_layer="NemotronHBlock",
    blocks=(Block("mixer", module="mixer", norm="norm", returns_tuple=False, linear_weight=None, whole_layer=True),),
    per_layer_attributes=frozenset(
        {
            # attention blocks
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            # MLP blocks
            "intermediate_size",
            # MoE blocks
            "n_routed_experts",  # alias `num_local_experts`
            "num_experts_per_tok",
            "moe_intermediate_size",
            "moe_shared_expert_intermediate_size",
            # mamba blocks
            "mamba_num_heads",
            "mamba_head_dim",
            "ssm_state_size",
            "n_groups",
            "conv_kernel",
        }
    ),
    optional_globals=(),
    has_layer_types=False,
    accepts_mask_mapping=True,
    rotary=None,
    moe_attributes=(
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "moe_shared_expert_intermediate_size",
    ),
    moe_width=None,
    mixer_list="layers_block_type",
    mixer_types={
        "full_attention": ("attention", "attention"),
        "linear_attention": ("mamba", "mamba"),
        "mlp": ("mlp", "mlp"),
        "moe": ("moe", "mlp"),
    },
    mamba_attributes=("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel"),
    init_layer=init_mamba,
    checkpoint_index=checkpoint_index,
)
