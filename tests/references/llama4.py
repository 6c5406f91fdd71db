"""Plain reference implementation of (heterogeneous) Llama4 text decoders (`Llama4ForCausalLM`).

Independent of ``transformers`` modeling code and of ``hetgraph``: torch, safetensors and the
standard library only (plus the shared math helpers of ``references/llama.py``, which obey the same rule).
It reads ``config.json`` and the safetensors files and writes the math out: RMSNorm; attention with
RoPE applied to adjacent (even, odd) pairs, parameter-free L2 norm of q and k on RoPE layers, query
temperature tuning on NoPE layers, chunked attention on RoPE layers; a dense SwiGLU MLP, or a MoE
whose every expert sees every token scaled by sigmoid(top-k router logit), plus a shared expert.

Layer lists: ``no_rope_layers`` (1 = RoPE, 0 = NoPE; NoPE layers attend globally), ``moe_layers``.
Per-layer overrides (``per_layer_config``): ``intermediate_size`` (MoE), ``intermediate_size_mlp``
(dense), ``num_local_experts``, ``num_experts_per_tok``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``attention_chunk_size`` and ``skip`` (``attention`` /
``mlp``). Public API: ``load_reference(path)`` with ``.logits(ids, mask)`` and ``.greedy(ids, n, mask)``.
"""

import json
import math
import os

import torch

from .llama import (
    ReferenceModel,
    _load_tensors,
    _rope_parameters,
    allowed_keys,
    inv_freq,
    per_layer_entries,
    positions_from_mask,
)

LAYER_ATTRS = (
    "intermediate_size",
    "intermediate_size_mlp",
    "num_local_experts",
    "num_experts_per_tok",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "attention_chunk_size",
)


def rms(x, eps):
    x32 = x.float()
    return x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def silu_glu(x, gate, up, down):
    lin = torch.nn.functional.linear
    return lin(torch.nn.functional.silu(lin(x, gate)) * lin(x, up), down)


class Llama4Ref(ReferenceModel):
    def __init__(self, cfg, tensors, strict=True):
        self.cfg = cfg
        self.eps = cfg["rms_norm_eps"]
        self.hidden = H = cfg["hidden_size"]
        self.rope = _rope_parameters(cfg)
        self._t, self._used = tensors, set()
        n = cfg["num_hidden_layers"]
        heads = cfg["num_attention_heads"]
        glob = {a: cfg.get(a) for a in LAYER_ATTRS}
        glob["num_key_value_heads"] = glob["num_key_value_heads"] or heads
        glob["head_dim"] = glob["head_dim"] or H // heads
        interval = cfg.get("no_rope_layer_interval", 4)
        rope_layers = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
        step = cfg.get("interleave_moe_layer_step", 1)
        moe_layers = cfg.get("moe_layers")
        moe_layers = set(range(step - 1, n, step) if moe_layers is None else moe_layers)
        per_layer = per_layer_entries(cfg)
        self.embed = self._take("model.embed_tokens.weight", (cfg["vocab_size"], H))
        self.layers = []
        for i in range(n):
            over = per_layer.get(i, {})
            unknown = set(over) - set(LAYER_ATTRS) - {"skip"}
            if unknown:
                raise ValueError(f"layer {i}: unknown per-layer keys {sorted(unknown)}")
            L = {a: over.get(a, glob[a]) for a in LAYER_ATTRS}
            L["rope"] = bool(rope_layers[i])
            if not L["rope"]:
                L["attention_chunk_size"] = None  # NoPE layers attend globally
            skip, p = set(over.get("skip", ())), f"model.layers.{i}."
            L["attention"] = None
            if "attention" not in skip:
                nq, nkv, d = L["num_attention_heads"], L["num_key_value_heads"], L["head_dim"]
                L["attention"] = {
                    "norm": self._take(p + "input_layernorm.weight", (H,)),
                    "q": self._take(p + "self_attn.q_proj.weight", (nq * d, H)),
                    "k": self._take(p + "self_attn.k_proj.weight", (nkv * d, H)),
                    "v": self._take(p + "self_attn.v_proj.weight", (nkv * d, H)),
                    "o": self._take(p + "self_attn.o_proj.weight", (H, nq * d)),
                    "inv_freq": inv_freq(d, self.rope),
                }
            L["mlp"] = None
            if "mlp" not in skip:
                f = p + "feed_forward."
                w = {"norm": self._take(p + "post_attention_layernorm.weight", (H,)), "moe": i in moe_layers}
                if w["moe"]:
                    E, m = L["num_local_experts"], L["intermediate_size"]
                    w["router"] = self._take(f + "router.weight", (E, H))
                    w["gate_up"] = self._take(f + "experts.gate_up_proj", (E, H, 2 * m))
                    w["down"] = self._take(f + "experts.down_proj", (E, m, H))
                    f += "shared_expert."
                else:
                    m = L["intermediate_size_mlp"]
                w["gate"] = self._take(f + "gate_proj.weight", (m, H))
                w["up"] = self._take(f + "up_proj.weight", (m, H))
                w["down_dense"] = self._take(f + "down_proj.weight", (H, m))
                L["mlp"] = w
            self.layers.append(L)
        self._take_head("model.norm.weight", cfg["vocab_size"], H, strict)

    def _attention(self, x, a, L, positions, mask):
        B, T, _ = x.shape
        nq, nkv, d = L["num_attention_heads"], L["num_key_value_heads"], L["head_dim"]
        lin = torch.nn.functional.linear
        q = lin(x, a["q"]).view(B, T, nq, d)
        k = lin(x, a["k"]).view(B, T, nkv, d)
        v = lin(x, a["v"]).view(B, T, nkv, d)
        if L["rope"]:
            angles = positions.double()[:, :, None, None] * a["inv_freq"]  # [B, T, 1, d/2]
            cos, sin = angles.cos().float(), angles.sin().float()

            def rotate(t):  # (even, odd) pairs are the real and imaginary parts
                even, odd = t[..., 0::2], t[..., 1::2]
                return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)

            q, k = rotate(q), rotate(k)
            if self.cfg.get("use_qk_norm", True):
                q, k = rms(q, self.eps), rms(k, self.eps)
        elif self.cfg.get("attn_temperature_tuning", True):
            # Query scale by the position in the sequence (padding included), on NoPE layers only.
            index = torch.arange(T, dtype=torch.float32)
            scale = torch.log1p(torch.floor((index + 1) / self.cfg["floor_scale"])) * self.cfg["attn_scale"] + 1
            q = q * scale[None, :, None, None]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k = k.repeat_interleave(nq // nkv, dim=1)
        v = v.repeat_interleave(nq // nkv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        allowed = allowed_keys(positions, mask, chunk=L["attention_chunk_size"])[:, None]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))
        return lin((probs @ v).transpose(1, 2).reshape(B, T, nq * d), a["o"])

    def _mlp(self, x, w, L):
        out = silu_glu(x, w["gate"], w["up"], w["down_dense"])  # the dense MLP, or the shared expert
        if not w["moe"]:
            return out
        logits = x @ w["router"].T  # [B, T, E]
        top, idx = logits.topk(L["num_experts_per_tok"], dim=-1)
        scores = torch.sigmoid(torch.full_like(logits, float("-inf")).scatter(-1, idx, top))
        for e in range(logits.shape[-1]):  # every expert sees every token, pre-scaled by its score
            gate, up = ((x * scores[..., e : e + 1]) @ w["gate_up"][e]).chunk(2, dim=-1)
            out = out + (torch.nn.functional.silu(gate) * up) @ w["down"][e]
        return out

    @torch.no_grad()
    def logits(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        positions = positions_from_mask(attention_mask, B, T)
        h = self.embed[input_ids]
        for L in self.layers:
            if L["attention"] is not None:
                x = (rms(h, self.eps) * L["attention"]["norm"])
                h = h + self._attention(x, L["attention"], L, positions, attention_mask)
            if L["mlp"] is not None:
                h = h + self._mlp(rms(h, self.eps) * L["mlp"]["norm"], L["mlp"], L)
        return torch.nn.functional.linear(rms(h, self.eps) * self.norm, self.lm_head)


def load_reference(path, strict=True):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config["model_type"] != "llama4_text":
        raise NotImplementedError(f"model_type {config['model_type']!r}")
    return Llama4Ref(config, _load_tensors(path), strict=strict)
