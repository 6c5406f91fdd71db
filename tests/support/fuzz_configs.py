"""Hypothesis strategies: random heterogeneous configs for every family, and invalid variations of them.

Every drawn config is valid by construction (values from the ranges each family's modeling code
accepts, KV heads dividing the layer's heads, top-k within the layer's experts, a window or a chunk
but never both); `invalid_variations` then breaks one attribute of one layer.
"""

from __future__ import annotations

from hypothesis import strategies as st

VOCAB = 96
BLOCK_KINDS = ["full", "full", "full", "skip", "linear"]  # full blocks most often


def _divisors(n: int) -> list[int]:
    return [d for d in (1, 2, 4, 8) if n % d == 0]


@st.composite
def _heads(draw, o: dict, heads: int, kv: int) -> None:
    """Per-layer heads / KV heads / head_dim, each drawn or left global; KV heads divide heads."""
    h = draw(st.sampled_from([None, 2, 4, 8]))
    if h is not None and h != heads:
        o["num_attention_heads"] = h
    layer_heads = h or heads
    k = draw(st.sampled_from([None, *_divisors(layer_heads)]))
    if k is None and layer_heads % kv:
        k = 1
    if k is not None:
        o["num_key_value_heads"] = k
    if draw(st.booleans()):
        o["head_dim"] = draw(st.sampled_from([8, 16]))


@st.composite
def _removed_block(draw, o: dict) -> None:
    skip = draw(st.sampled_from([[], [], ["attention"], ["mlp"]]))
    if skip:
        o["skip"] = skip


@st.composite
def llama_family(draw) -> dict:
    """Llama, Mistral, Qwen2, Qwen3: widths, heads, head dims, removed and linear blocks, windows, chunks."""
    family = draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]))
    layers = draw(st.integers(2, 4))
    per_layer = {}
    for i in range(layers):
        o: dict = {}
        if draw(st.booleans()):
            o["intermediate_size"] = draw(st.sampled_from([16, 48, 96]))
        draw(_heads(o, 4, 2))
        attention, mlp = draw(st.sampled_from(BLOCK_KINDS)), draw(st.sampled_from(BLOCK_KINDS))
        for kind in ("skip", "linear"):
            blocks = [b for b, k in (("attention", attention), ("mlp", mlp)) if k == kind]
            if blocks:
                o[kind] = blocks
        mask = draw(st.sampled_from([None, None, "window", "chunk"]))
        if mask == "window":
            o["sliding_window"] = draw(st.integers(1, 6))
        elif mask == "chunk":
            o["attention_chunk_size"] = draw(st.integers(2, 6))
        if o:
            per_layer[i] = o
    d = dict(model_type=family, hidden_size=64, num_hidden_layers=layers, vocab_size=VOCAB, intermediate_size=64,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             tie_word_embeddings=draw(st.booleans()), per_layer_config=per_layer)
    if family == "mistral":
        d["sliding_window"] = None  # Mistral's default is a global 4096 window
    return d


@st.composite
def gpt_oss(draw) -> dict:
    layers = draw(st.integers(2, 4))
    per_layer = {}
    for i in range(layers):
        o: dict = {}
        if draw(st.booleans()):
            o["intermediate_size"] = draw(st.sampled_from([16, 48]))
        experts = draw(st.sampled_from([None, 2, 3, 6]))
        if experts is not None:
            o["num_local_experts"] = experts
        top = draw(st.sampled_from([None, 1, 2]))
        if top is not None and top <= (experts or 4):
            o["num_experts_per_tok"] = top
        draw(_heads(o, 4, 2))
        if draw(st.booleans()):
            o["sliding_window"] = draw(st.integers(2, 6))
        draw(_removed_block(o))
        if o:
            per_layer[i] = o
    return dict(model_type="gpt_oss", hidden_size=64, num_hidden_layers=layers, vocab_size=VOCAB,
                intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_local_experts=4, num_experts_per_tok=2, sliding_window=5, max_position_embeddings=128,
                tie_word_embeddings=draw(st.booleans()), per_layer_config=per_layer)


@st.composite
def llama4(draw) -> dict:
    layers = draw(st.integers(2, 4))
    no_rope = [draw(st.sampled_from([1, 1, 0])) for _ in range(layers)]
    moe = [i for i in range(layers) if draw(st.booleans())]
    per_layer = {}
    for i in range(layers):
        o: dict = {}
        if i in moe:
            if draw(st.booleans()):
                o["intermediate_size"] = draw(st.sampled_from([16, 48]))
            experts = draw(st.sampled_from([None, 2, 3]))
            if experts is not None:
                o["num_local_experts"] = experts
            if draw(st.booleans()):
                o["num_experts_per_tok"] = draw(st.integers(1, experts or 4))
        elif draw(st.booleans()):
            o["intermediate_size_mlp"] = draw(st.sampled_from([32, 96]))
        draw(_heads(o, 4, 2))
        if no_rope[i] and draw(st.booleans()):
            o["attention_chunk_size"] = draw(st.integers(2, 6))
        draw(_removed_block(o))
        if o:
            per_layer[i] = o
    return dict(model_type="llama4_text", hidden_size=64, num_hidden_layers=layers, vocab_size=VOCAB,
                intermediate_size=32, intermediate_size_mlp=64, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=4,
                no_rope_layers=no_rope, moe_layers=moe, floor_scale=4, max_position_embeddings=128,
                tie_word_embeddings=draw(st.booleans()), per_layer_config=per_layer)


@st.composite
def nemotron_h(draw) -> dict:
    blocks = draw(st.lists(st.sampled_from(["full_attention", "linear_attention", "moe", "mlp"]), min_size=2,
                           max_size=5))
    per_layer = {}
    for i, block in enumerate(blocks):
        o: dict = {}
        if block == "full_attention":
            draw(_heads(o, 4, 2))
        elif block == "linear_attention":
            groups = draw(st.sampled_from([1, 2]))
            o.update(mamba_num_heads=draw(st.sampled_from([4, 8])), n_groups=groups,
                     ssm_state_size=draw(st.sampled_from([8, 16])), conv_kernel=draw(st.sampled_from([3, 4])))
        elif block == "moe":
            experts = draw(st.sampled_from([3, 4, 6]))
            o.update(n_routed_experts=experts, num_experts_per_tok=draw(st.integers(1, 2)),
                     moe_intermediate_size=draw(st.sampled_from([24, 32])),
                     moe_shared_expert_intermediate_size=draw(st.sampled_from([40, 48])))
        else:
            o["intermediate_size"] = draw(st.sampled_from([48, 96]))
        if draw(st.integers(0, 5)) == 0:
            o = {"skip": ["mixer"]}
        per_layer[i] = o
    return dict(model_type="nemotron_h", hidden_size=64, vocab_size=VOCAB, layers_block_type=blocks,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                moe_shared_expert_intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16,
                n_groups=2, conv_kernel=4, chunk_size=8, time_step_floor=0.01, max_position_embeddings=128,
                tie_word_embeddings=draw(st.booleans()), per_layer_config=per_layer)


def _has_sequence_layer(d: dict) -> bool:
    """Some layer keeps attention: hetgraph rejects a model without one."""
    per_layer = d["per_layer_config"]
    if "layers_block_type" in d:
        return any(b == "full_attention" and "skip" not in per_layer.get(i, {})
                   for i, b in enumerate(d["layers_block_type"]))
    removed = lambda o: "attention" in o.get("skip", []) or "attention" in o.get("linear", [])  # noqa: E731
    return any(not removed(per_layer.get(i, {})) for i in range(d["num_hidden_layers"]))


FAMILIES = {name: strategy.filter(_has_sequence_layer) for name, strategy in
            {"llama": llama_family(), "gpt_oss": gpt_oss(), "llama4": llama4(), "nemotron_h": nemotron_h()}.items()}

# attribute -> bad values, each breaking one rule every family checks; the error must name both.
_BAD_VALUES = {
    "num_key_value_heads": [0, -1, 3, 2.0, "2"],
    "num_attention_heads": [0, True],
    "head_dim": [0, -8],
    "hidden_size": [32],
    "vocab_size": [64],
    "rope_theta": [5.0],
    "skip": [["attn"], "attention"],
}


@st.composite
def invalid_variations(draw, family: str) -> tuple[dict, int, str]:
    """(config, layer, attribute): a valid draw of `family` with one layer's attribute broken."""
    d = draw(FAMILIES[family])
    layers = len(d["layers_block_type"]) if family == "nemotron_h" else d["num_hidden_layers"]
    layer = draw(st.integers(0, layers - 1))
    attribute = draw(st.sampled_from(sorted(_BAD_VALUES)))
    value = draw(st.sampled_from(_BAD_VALUES[attribute]))
    entry = dict(d["per_layer_config"].get(layer, {}))
    entry.pop("skip", None)  # a removed block does not read its sizes
    if family == "nemotron_h" and attribute in ("num_key_value_heads", "num_attention_heads", "head_dim"):
        d["layers_block_type"][layer] = "full_attention"  # a size is checked on the block that has it
        entry = {}
    if attribute == "num_key_value_heads" and value == 3 and entry.get("num_attention_heads", 4) % 3 == 0:
        value = 5  # must not divide the layer's heads
    entry[attribute] = value
    d["per_layer_config"][layer] = entry
    return d, layer, attribute
