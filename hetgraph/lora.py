"""LoRA on hetgraph models: the module names to adapt.

PEFT matches `target_modules` by module-name suffix and silently skips names that match nothing
(peft issue 3554). A stock list such as `["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
"up_proj", "down_proj"]` therefore misses the Linear of a block replaced by a linear map
(`linear_attn`, `linear_mlp`), and adapts nothing in a removed block (there is nothing there).
`lora_targets(model)` lists the linear layers the decoder layers really hold:

    peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=hetgraph.lora_targets(model)))

(`target_modules="all-linear"` reaches the same modules.) Training compiles with
`backend="hetgraph"` (layer sharing is off while gradients flow), and `merge_and_unload()` then
`save_pretrained` gives a checkpoint `hetgraph.from_pretrained` reads back.
"""

from __future__ import annotations

from torch import nn

from hetgraph.contract import model_spec


def lora_targets(model: nn.Module) -> list[str]:
    """Sorted leaf names of the `nn.Linear` modules inside the decoder layers (the LM head excluded)."""
    spec = model_spec(model)
    base = getattr(model, spec.adapter.base_model_attr, None)
    layers = getattr(base, "layers", None)
    if layers is None:
        where = f".{spec.adapter.base_model_attr}.layers"
        raise TypeError(f"lora_targets: {type(model).__name__} has no decoder layers at {where}")
    names = {n.rpartition(".")[2] for layer in layers for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)
