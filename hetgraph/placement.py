"""Placing a model's modules on several devices: `from_pretrained(path, device_map=...)`.

A device map as accelerate users write it: module name -> device (`""` for the whole model; a
device is a name, a `torch.device` or a CUDA index), or a device for everything, or `"auto"` /
`"balanced"`: the decoder layers split over the visible accelerators so that the fullest device
holds as few weight bytes as possible (the exact min-max contiguous split of `hetgraph.partition`,
not accelerate's greedy fill). With `max_memory` ({device: bytes or "40GiB"}) the layers spread
over those devices, each within the smallest cap, the embedding's and head's bytes counted on
every one. On a heterogeneous stack this is the difference between an even layer count and an
even load. The embedding and rotary module go with the first layers, the final norm and the head
with the last; a head tied to the embedding stays with it.

A map is resolved to placement units (the embedding, the rotary module, each decoder layer, the
final norm, the head): a key inside a decoder layer is refused (its residual adds would cross
devices, as transformers' `_no_split_modules` says). Where the units sit on more than one device,
each gets a forward pre-hook moving its tensor inputs to its device (what accelerate's
`AlignDevicesHook` does, without wrapping `forward`), and the model carries `hf_device_map` as
transformers' own loading would set it. `make_cache` puts each layer's cache on that layer's device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch.utils._pytree import tree_map

from hetgraph import attention
from hetgraph.partition import split_layers

AUTO = ("auto", "balanced")
_UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def resolve_device_map(model: torch.nn.Module, base_attr: str, device_map, *, dtype: torch.dtype,
                       max_memory: Mapping | None = None) -> dict[str, torch.device]:  # fmt: skip
    """Placement unit name -> device for `device_map` on `model` (its tensors may still be on meta:
    only shapes are read; `dtype` sizes them). Every error names the key, module or device at fault."""
    units = placement_units(model, base_attr)
    if isinstance(device_map, str) and device_map in AUTO:
        return _balanced(model, base_attr, units, dtype, max_memory)
    if max_memory is not None:
        raise ValueError(f"device_map: max_memory is for device_map='auto' / 'balanced'; got {device_map!r}")
    if not isinstance(device_map, Mapping):
        device_map = {"": device_map}
    known = dict(model.named_modules())
    placed: dict[str, torch.device] = {}
    for key, device in device_map.items():
        if key not in known:
            examples = ", ".join(sorted(units)[:3])
            raise ValueError(f"device_map: {key!r} is not a module of {type(model).__name__}; "
                             f"keys are module names such as {examples}, or '' for all")  # fmt: skip
        inside = [u for u in units if key.startswith(u + ".")]
        if inside:
            raise ValueError(f"device_map: {key!r} is inside {inside[0]!r}, which must sit on one device "
                             "(a decoder layer's residual adds would cross devices); map the whole module")  # fmt: skip
        placed[key] = _device(device, key)
    longest_first = sorted((k for k in placed if k), key=len, reverse=True)
    resolved = {}
    for unit in units:  # the longest key holding the unit wins, as in transformers' expand_device_map
        key = next((k for k in longest_first if unit == k or unit.startswith(k + ".")), "" if "" in placed else None)
        if key is None:
            raise ValueError(f"device_map: no entry places {unit!r}; add it (or a module holding it, or '')")
        resolved[unit] = placed[key]
    _check_tied(model, resolved)
    return resolved


def requested(model, base_attr: str, device, device_map, max_memory, dtype) -> dict[str, torch.device] | None:
    """The resolved map for a build's `device` / `device_map` / `max_memory` arguments; None for one device."""
    if device_map is None:
        if max_memory is not None:
            raise ValueError("max_memory goes with device_map='auto'")
        return None
    if device is not None:
        raise ValueError(f"device={device!r} and device_map={device_map!r}: give one of them")
    return resolve_device_map(model, base_attr, device_map, dtype=dtype, max_memory=max_memory)


def placement_units(model: torch.nn.Module, base_attr: str) -> list[str]:
    """The modules a device map places whole, in forward order: the base model's children (each
    decoder layer on its own), then the model's other children (the head)."""
    base = getattr(model, base_attr)
    units = []
    for name, child in base.named_children():
        if name == "layers":
            units += [f"{base_attr}.layers.{i}" for i in range(len(child))]
        else:
            units.append(f"{base_attr}.{name}")
    units += [name for name, _ in model.named_children() if name != base_attr]
    return units


def place(model: torch.nn.Module, placement: Mapping[str, torch.device] | None, device: torch.device) -> None:
    """Give every (meta) tensor storage on its unit's device (all on `device` without a placement)."""
    if placement is None:
        model.to_empty(device=device)
        return
    for unit, unit_device in placement.items():
        model.get_submodule(unit).to_empty(device=unit_device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"device_map: {left[0]!r} is in no placement unit of {type(model).__name__}")


def dispatch(model: torch.nn.Module, placement: Mapping[str, torch.device] | None) -> None:
    """Where the units sit on more than one device: input-moving pre-hooks and `hf_device_map`."""
    if placement is None or len(set(placement.values())) < 2:
        return
    for unit, device in placement.items():
        model.get_submodule(unit).register_forward_pre_hook(_to_device(device), with_kwargs=True)
    model.hf_device_map = {unit: (d.index if d.type == "cuda" else str(d)) for unit, d in placement.items()}


def layer_device(model: torch.nn.Module, layer: torch.nn.Module) -> torch.device:
    """The device a decoder layer's cache belongs on: that of its weights (the model's for a layer with none)."""
    return next((p.device for p in layer.parameters()), model.device)


def _to_device(device: torch.device):
    def move(t):
        return attention.on_device(t, device)

    def hook(module, args, kwargs):
        # A layer picks its own mask and RoPE from the model's per-window dicts and moves only those
        # (`attention.LayerInputs`): moving the dicts here would copy every window's mask.
        kept = {k: kwargs[k] for k in (attention.MASKS_KWARG, attention.ROPE_KWARG) if k in kwargs}
        moved = tree_map(move, {k: v for k, v in kwargs.items() if k not in kept})
        return tree_map(move, args), {**moved, **kept}

    return hook


def _device(device, key: str) -> torch.device:
    if device == "disk":
        raise ValueError(f"device_map: {key!r} -> 'disk': offloading to disk is not supported; use a device")
    try:
        d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device_map: {key!r} -> {device!r} is not a device ({e})") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device_map: {key!r} -> {d}: this machine has {torch.cuda.device_count()} CUDA devices")
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    if d.type == "meta":
        raise ValueError(f"device_map: {key!r} -> meta: weights need real storage")
    return d


def _check_tied(model, resolved: Mapping[str, torch.device]) -> None:
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    names = (_name_of(model, model.get_input_embeddings()), _name_of(model, model.get_output_embeddings()))
    devices = {n: resolved[n] for n in names if n in resolved}
    if len(set(devices.values())) > 1:
        raise ValueError(f"device_map: the head is tied to the embedding, so they share one device; got "
                         + ", ".join(f"{n} -> {d}" for n, d in devices.items()))  # fmt: skip


def _bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in module.parameters())


def _memory(value, device: torch.device) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|MiB|KiB|GB|MB|KB)\s*", str(value))
    if match is None:
        raise ValueError(f"max_memory[{device}] = {value!r}; allowed: bytes or a size like '40GiB' / '500MB'")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _balanced(model, base_attr, units, dtype, max_memory) -> dict[str, torch.device]:
    if max_memory is not None:
        devices = [_device(d, f"max_memory[{d!r}]") for d in max_memory]
        caps = [_memory(v, d) for d, v in zip(devices, max_memory.values())]
    elif torch.cuda.is_available():
        devices, caps = [torch.device("cuda", i) for i in range(torch.cuda.device_count())], None
    else:
        devices, caps = [torch.device("cpu")], None
    layers = [u for u in units if u.startswith(f"{base_attr}.layers.")]
    # before the layers, and parameter-free units (the rotary module: computed from the positions)
    before = [u for u in units if u not in layers and (units.index(u) < units.index(layers[0])
                                                       or not _bytes(model.get_submodule(u), dtype))]  # fmt: skip
    after = [u for u in units if u not in layers and u not in before]
    tied = getattr(model.config, "tie_word_embeddings", False)
    first = sum(_bytes(model.get_submodule(u), dtype) for u in before)
    last = 0 if tied else sum(_bytes(model.get_submodule(u), dtype) for u in after)
    costs = [float(_bytes(model.get_submodule(u), dtype)) for u in layers]
    n = min(len(devices), len(layers))
    # one cap for all: the smallest device's, less what the first or last device also holds
    cap = min(caps[:n]) - max(first, last) if caps else None
    try:
        ranges = split_layers(costs, n, first=first, last=last, memory=costs if caps else None, memory_cap=cap)
    except ValueError as e:
        raise ValueError(f"device_map='auto': the weights do not fit max_memory={dict(max_memory)}: {e}") from None
    resolved = {u: devices[0] for u in before}
    for d, r in zip(devices, ranges):
        resolved.update({layers[i]: d for i in r})
    resolved.update({u: devices[n - 1] for u in after})
    if tied and (head := _name_of(model, model.get_output_embeddings())) in resolved:
        resolved[head] = devices[0]
    return {u: resolved[u] for u in units}


def _name_of(model: torch.nn.Module, module: torch.nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)
