"""Plain reference implementation of (heterogeneous) Llama-family decoders.

This module is deliberately independent of both ``transformers`` modeling code
and ``hetgraph``: it only uses torch, safetensors and the standard library, and
reads a checkpoint directory (``config.json`` plus ``model.safetensors`` or a
sharded ``model.safetensors.index.json``) directly.  Tests use it as an
oracle: if hetgraph's models agree with this file, they agree with the math
written out here, not merely with themselves.

Public API:
    load_reference(path, dtype=torch.float32, strict=True) -> RefModel
    RefModel.logits(input_ids, attention_mask=None) -> [B, T, V] logits
    RefModel.greedy(input_ids, max_new_tokens, attention_mask=None) -> [B, T + N] ids

Everything is a full, cache-free forward pass.  Supported: model_type llama,
mistral, qwen2, qwen3; per-layer overrides via ``per_layer_config`` (sizes,
head counts, head_dim, sliding_window, attention_chunk_size, ``skip`` and
``linear`` blocks); RoPE types "default" and "llama3".  Two other layouts are
read straight from their own fields: Nemotron-NAS (model_type "nemotron-nas",
``block_configs``) and LLM-Drop (``drop_attn_list`` / ``drop_mlp_list``).
"""

import json
import math
import os

import torch
from safetensors.torch import load_file

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_ATTRS = (
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "attention_chunk_size",
)


def _load_tensors(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    return tensors


def _rope_parameters(cfg):
    rope = cfg.get("rope_parameters")
    if rope is None:  # older layout: top-level rope_theta (+ rope_scaling)
        rope = dict(cfg.get("rope_scaling") or {})
        if "rope_theta" in cfg:
            rope["rope_theta"] = cfg["rope_theta"]
    rope = dict(rope)
    rope.setdefault("rope_type", rope.get("type", "default"))
    if "rope_theta" not in rope:
        raise ValueError("config has no rope_theta")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor")
    if rope["rope_type"] not in ("default", "llama3"):
        raise NotImplementedError(f"rope_type {rope['rope_type']!r}")
    return rope


def inv_freq(head_dim, rope):
    """RoPE inverse frequencies for one head_dim (Llama-3.1 scaling if asked)."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    freq = 1.0 / rope["rope_theta"] ** exps
    if rope["rope_type"] == "llama3":
        factor = rope["factor"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        out = []
        for f in freq.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old_len / high:  # high frequency: unchanged
                out.append(f)
            elif wavelen > old_len / low:  # low frequency: fully scaled
                out.append(f / factor)
            else:  # in between: interpolate
                smooth = (old_len / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        freq = torch.tensor(out, dtype=torch.float64)
    return freq


def rms_norm(x, weight, eps):
    x32 = x.float()
    x32 = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x32).to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def positions_from_mask(attention_mask, batch, length):
    """[B, T] positions: cumsum(mask) - 1 clamped at 0, or arange(T)."""
    if attention_mask is None:
        return torch.arange(length).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def allowed_keys(positions, attention_mask, window=None, chunk=None):
    """Boolean [B, T(query), T(key)]: which keys each query may attend to."""
    batch, length = positions.shape
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = (j <= i).expand(batch, length, length)
    if window is not None:
        allowed = allowed & (i - window < j)
    if chunk is not None:
        p = positions
        allowed = allowed & (p[:, None, :] // chunk == p[:, :, None] // chunk)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    return allowed


class ReferenceModel:
    """What every family's reference shares: greedy decoding by recomputing the whole forward, and
    taking a checkpoint tensor after checking its shape (families keep their tensors in `self._t`)."""

    @torch.no_grad()
    def greedy(self, input_ids, max_new_tokens, attention_mask=None):
        ids, mask = input_ids, attention_mask
        for _ in range(max_new_tokens):
            nxt = self.logits(ids, mask)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, nxt), dim=1)
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        return ids

    def _take(self, name, shape):
        t = self._t[name]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        self._used.add(name)
        return t.float()

    def _take_head(self, norm_name, vocab, hidden, strict):
        """The final norm and the LM head (the embedding when the checkpoint has no `lm_head.weight`),
        then `unused_keys`: the checkpoint tensors the config did not explain (with `strict`, an error)."""
        self.norm = self._take(norm_name, (hidden,))
        self.lm_head = self._take("lm_head.weight", (vocab, hidden)) if "lm_head.weight" in self._t else self.embed
        self.unused_keys = sorted(set(self._t) - self._used)
        if strict and self.unused_keys:
            raise ValueError(f"checkpoint has tensors the config does not explain: {self.unused_keys}")


class RefModel(ReferenceModel):
    def __init__(self, config, tensors, dtype=torch.float32, strict=True):
        self.config = cfg = config
        # A Nemotron-NAS (DeciLM) decoder is a Llama decoder whose blocks vary.
        self.model_type = "llama" if cfg["model_type"] == "nemotron-nas" else cfg["model_type"]
        if self.model_type not in FAMILIES:
            raise NotImplementedError(f"model_type {self.model_type!r}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r}")
        self.dtype = dtype
        self.eps = cfg["rms_norm_eps"]
        self.rope = _rope_parameters(cfg)
        self.hidden = cfg["hidden_size"]
        self._t = {k: v.to(dtype) for k, v in tensors.items()}
        self._used = set()

        per_layer = _per_layer(cfg)
        heads = cfg["num_attention_heads"]
        glob = {
            "intermediate_size": cfg["intermediate_size"],
            "num_attention_heads": heads,
            "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
            "head_dim": cfg.get("head_dim") or self.hidden // heads,
            "sliding_window": cfg.get("sliding_window"),
            "attention_chunk_size": cfg.get("attention_chunk_size"),
        }
        qkv_bias = self.model_type == "qwen2" or bool(cfg.get("attention_bias", False))
        o_bias = self.model_type != "qwen2" and bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))

        self.embed = self._take("model.embed_tokens.weight")
        vocab = cfg["vocab_size"]
        if self.embed.shape != (vocab, self.hidden):
            raise ValueError(f"embed_tokens shape {tuple(self.embed.shape)}")
        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            over = per_layer.get(i, {})
            unknown = set(over) - set(LAYER_ATTRS) - {"skip", "linear"}
            if unknown:
                raise ValueError(f"layer {i}: unknown per-layer keys {sorted(unknown)}")
            layer = {a: over.get(a, glob[a]) for a in LAYER_ATTRS}
            skip, linear = set(over.get("skip", ())), set(over.get("linear", ()))
            pre = f"model.layers.{i}."
            for block, norm, lin_name in (
                ("attention", "input_layernorm", "self_attn.linear_attn"),
                ("mlp", "post_attention_layernorm", "mlp.linear_mlp"),
            ):
                if block in skip:
                    layer[block] = None
                    continue
                w = {"norm": self._take(pre + norm + ".weight", (self.hidden,))}
                if block in linear:
                    w["kind"] = "linear"
                    w["weight"] = self._take(f"{pre}{lin_name}.weight", (self.hidden, self.hidden))
                elif block == "attention":
                    w["kind"] = "attention"
                    nq, nkv, d = layer["num_attention_heads"], layer["num_key_value_heads"], layer["head_dim"]
                    if nq % nkv:
                        raise ValueError(f"layer {i}: {nq} heads not divisible by {nkv} kv heads")
                    for name, rows, bias in (("q", nq * d, qkv_bias), ("k", nkv * d, qkv_bias),
                                             ("v", nkv * d, qkv_bias)):
                        w[name] = self._take(f"{pre}self_attn.{name}_proj.weight", (rows, self.hidden))
                        w[name + "_b"] = self._take(f"{pre}self_attn.{name}_proj.bias", (rows,)) if bias else None
                    w["o"] = self._take(f"{pre}self_attn.o_proj.weight", (self.hidden, nq * d))
                    w["o_b"] = self._take(f"{pre}self_attn.o_proj.bias", (self.hidden,)) if o_bias else None
                    if self.model_type == "qwen3":
                        w["q_norm"] = self._take(f"{pre}self_attn.q_norm.weight", (d,))
                        w["k_norm"] = self._take(f"{pre}self_attn.k_norm.weight", (d,))
                    w["inv_freq"] = inv_freq(d, self.rope)
                else:
                    w["kind"] = "mlp"
                    m = layer["intermediate_size"]
                    for name, shape in (("gate", (m, self.hidden)), ("up", (m, self.hidden)),
                                        ("down", (self.hidden, m))):
                        w[name] = self._take(f"{pre}mlp.{name}_proj.weight", shape)
                        w[name + "_b"] = self._take(f"{pre}mlp.{name}_proj.bias", shape[:1]) if mlp_bias else None
                layer[block] = w
            self.layers.append(layer)
        self._take_head("model.norm.weight", vocab, self.hidden, strict)

    def _take(self, name, shape=None):
        if name not in self._t:
            raise KeyError(f"missing tensor {name}")
        t = self._t[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        self._used.add(name)
        return t

    # ---- blocks -------------------------------------------------------------

    def _attention(self, x, w, layer, positions, attention_mask):
        B, T, _ = x.shape
        nq, nkv, d = layer["num_attention_heads"], layer["num_key_value_heads"], layer["head_dim"]

        def proj(name, heads):
            y = torch.nn.functional.linear(x, w[name], w[name + "_b"])
            return y.view(B, T, heads, d)

        q, k, v = proj("q", nq), proj("k", nkv), proj("v", nkv)
        if self.model_type == "qwen3":
            q, k = rms_norm(q, w["q_norm"], self.eps), rms_norm(k, w["k_norm"], self.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]

        angles = positions.double()[:, :, None] * w["inv_freq"][None, None, :]  # [B, T, d/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, d]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        group = nq // nkv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(d)
        allowed = allowed_keys(positions, attention_mask, layer["sliding_window"],
                               layer["attention_chunk_size"])[:, None]  # [B, 1, T, T]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, nq * d)
        return torch.nn.functional.linear(out, w["o"], w["o_b"])

    def _mlp(self, x, w):
        lin = torch.nn.functional.linear
        gate = lin(x, w["gate"], w["gate_b"])
        up = lin(x, w["up"], w["up_b"])
        return lin(torch.nn.functional.silu(gate) * up, w["down"], w["down_b"])

    # ---- public -------------------------------------------------------------

    @torch.no_grad()
    def logits(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        positions = positions_from_mask(attention_mask, B, T)
        h = self.embed[input_ids]
        for layer in self.layers:
            for block in ("attention", "mlp"):
                w = layer[block]
                if w is None:  # skipped block: identity
                    continue
                x = rms_norm(h, w["norm"], self.eps)
                if w["kind"] == "linear":
                    h = h + torch.nn.functional.linear(x, w["weight"])
                elif w["kind"] == "attention":
                    h = h + self._attention(x, w, layer, positions, attention_mask)
                else:
                    h = h + self._mlp(x, w)
        h = rms_norm(h, self.norm, self.eps)
        return torch.nn.functional.linear(h, self.lm_head).float()


# hetgraph marks checkpoints stock transformers would misread with this per-layer note (and nothing
# else changes in the file): a reader that implements the per-layer semantics ignores it.
GUARD_NOTE = "requires_hetgraph"


def per_layer_entries(cfg) -> dict[int, dict]:
    """``per_layer_config`` with int keys, without hetgraph's note for stock readers."""
    entries = {int(k): {a: x for a, x in v.items() if a != GUARD_NOTE} for k, v in (cfg.get("per_layer_config") or {}).items()}
    return {i: v for i, v in entries.items() if v and i < cfg.get("num_hidden_layers", float("inf"))}


def _per_layer(cfg):
    """Layer index -> overrides, from ``per_layer_config``, ``block_configs`` or LLM-Drop's lists."""
    per_layer = per_layer_entries(cfg)
    for i, block in enumerate(cfg.get("block_configs") or []):
        # DeciLM: KV heads = heads / n_heads_in_group; MLP width = 2/3 * ffn_mult * hidden, to a multiple of 256.
        over = per_layer.setdefault(i, {})
        attn, ffn = block["attention"], block["ffn"]
        for name, sub in (("attention", attn), ("mlp", ffn)):
            if sub.get("no_op"):
                over.setdefault("skip", []).append(name)
            elif sub.get("replace_with_linear"):
                over.setdefault("linear", []).append(name)
        if not attn.get("no_op") and not attn.get("replace_with_linear"):
            over["num_key_value_heads"] = cfg["num_attention_heads"] // attn["n_heads_in_group"]
        if not ffn.get("no_op") and not ffn.get("replace_with_linear"):
            mult = round(ffn["ffn_mult"], 6)  # DeciLM's FFNConfig keeps 6 decimals
            over["intermediate_size"] = math.ceil(int(2 * mult * cfg["hidden_size"] / 3) / 256) * 256
    for key, name in (("drop_attn_list", "attention"), ("drop_mlp_list", "mlp")):
        dropped = cfg.get(key) or []
        if dropped and all(isinstance(v, bool) for v in dropped):  # one bool per layer
            dropped = [i for i, v in enumerate(dropped) if v]
        for i in dropped:
            per_layer.setdefault(i, {}).setdefault("skip", []).append(name)
    return per_layer


def load_reference(path, dtype=torch.float32, strict=True):
    """Read ``path/config.json`` and all safetensors into a RefModel.

    strict=True raises if the checkpoint holds tensors the config does not
    account for (e.g. weights left behind for a skipped block).
    """
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    return RefModel(config, _load_tensors(path), dtype=dtype, strict=strict)
