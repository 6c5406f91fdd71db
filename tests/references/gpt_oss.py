"""Plain reference implementation of (heterogeneous) GptOss decoders.

Independent of ``transformers`` modeling code and of ``hetgraph``: torch, safetensors and the
standard library only (plus the shared math helpers of ``references/llama.py``, which obey the same rule).
It reads ``config.json`` and the safetensors files of a checkpoint directory and writes the math
out: RMSNorm, attention with per-head sink logits and optional sliding window, YaRN RoPE per
head_dim, and the top-k mixture of clamped-SwiGLU experts with biases.

Per-layer overrides (``per_layer_config``): ``intermediate_size``, ``num_local_experts`` (or its
alias ``num_experts``), ``num_experts_per_tok``, ``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``sliding_window`` (a layer's own window counts whatever the global ``layer_types``
says; without one, a layer typed ``sliding_attention`` uses the global window) and ``skip``
(``attention`` / ``mlp``).

Public API: ``load_reference(path) -> GptOssRef`` with ``.logits(ids, mask)`` and ``.greedy(ids, n, mask)``.
"""

import json
import math
import os

import torch

from .llama import ReferenceModel, _load_tensors, allowed_keys, per_layer_entries, positions_from_mask

ALIASES = {"num_experts": "num_local_experts"}
LAYER_ATTRS = (
    "intermediate_size",
    "num_local_experts",
    "num_experts_per_tok",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
)


def yarn(head_dim, rope, max_position_embeddings):
    """YaRN inverse frequencies (float64) and the cos/sin scale, from the paper's recipe."""
    base = rope.get("rope_theta", 150000.0)
    factor = rope.get("factor") or max_position_embeddings / rope["original_max_position_embeddings"]
    original = rope["original_max_position_embeddings"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1
    scale = rope.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def dim_for(rotations):  # the dimension that turns `rotations` times over the original context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    extrapolation = 1.0 / base**exponents
    interpolation = extrapolation / factor
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: high frequency, kept as is; 0: low frequency, interpolated
    return interpolation * (1 - keep) + extrapolation * keep, scale


def rms_norm(x, weight, eps):
    x32 = x.float()
    return (weight.float() * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


class GptOssRef(ReferenceModel):
    def __init__(self, cfg, tensors, strict=True):
        self.cfg = cfg
        self.eps = cfg["rms_norm_eps"]
        self.hidden = H = cfg["hidden_size"]
        self.alpha, self.limit = cfg.get("swiglu_alpha", 1.702), cfg.get("swiglu_limit", 7.0)
        self.rope = cfg["rope_parameters"]
        self._t, self._used = tensors, set()
        heads = cfg["num_attention_heads"]
        glob = {
            "intermediate_size": cfg["intermediate_size"],
            "num_local_experts": cfg["num_local_experts"],
            "num_experts_per_tok": cfg["num_experts_per_tok"],
            "num_attention_heads": heads,
            "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
            "head_dim": cfg.get("head_dim") or H // heads,
        }
        n = cfg["num_hidden_layers"]
        types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        bias = cfg.get("attention_bias", True)
        per_layer = {
            k: {ALIASES.get(a, a): v for a, v in o.items()} for k, o in per_layer_entries(cfg).items()
        }
        self.embed = self._take("model.embed_tokens.weight", (cfg["vocab_size"], H))
        self.layers = []
        for i in range(n):
            over = per_layer.get(i, {})
            unknown = set(over) - set(LAYER_ATTRS) - {"skip"}
            if unknown:
                raise ValueError(f"layer {i}: unknown per-layer keys {sorted(unknown)}")
            L = {a: over.get(a, glob[a]) for a in LAYER_ATTRS if a != "sliding_window"}
            if "sliding_window" in over:
                L["window"] = over["sliding_window"]
            else:
                L["window"] = cfg.get("sliding_window") if types[i] == "sliding_attention" else None
            skip = set(over.get("skip", ()))
            p = f"model.layers.{i}."
            L["attention"] = None
            if "attention" not in skip:
                nq, nkv, d = L["num_attention_heads"], L["num_key_value_heads"], L["head_dim"]
                a = {"norm": self._take(p + "input_layernorm.weight", (H,))}
                for name, rows in (("q", nq * d), ("k", nkv * d), ("v", nkv * d)):
                    a[name] = self._take(f"{p}self_attn.{name}_proj.weight", (rows, H))
                    a[name + "_b"] = self._take(f"{p}self_attn.{name}_proj.bias", (rows,)) if bias else None
                a["o"] = self._take(p + "self_attn.o_proj.weight", (H, nq * d))
                a["o_b"] = self._take(p + "self_attn.o_proj.bias", (H,)) if bias else None
                a["sinks"] = self._take(p + "self_attn.sinks", (nq,))
                a["inv_freq"], a["rope_scale"] = yarn(d, self.rope, cfg["max_position_embeddings"])
                L["attention"] = a
            L["mlp"] = None
            if "mlp" not in skip:
                E, m = L["num_local_experts"], L["intermediate_size"]
                L["mlp"] = {
                    "norm": self._take(p + "post_attention_layernorm.weight", (H,)),
                    "router": self._take(p + "mlp.router.weight", (E, H)),
                    "router_b": self._take(p + "mlp.router.bias", (E,)),
                    "gate_up": self._take(p + "mlp.experts.gate_up_proj", (E, H, 2 * m)),
                    "gate_up_b": self._take(p + "mlp.experts.gate_up_proj_bias", (E, 2 * m)),
                    "down": self._take(p + "mlp.experts.down_proj", (E, m, H)),
                    "down_b": self._take(p + "mlp.experts.down_proj_bias", (E, H)),
                }
            self.layers.append(L)
        self._take_head("model.norm.weight", cfg["vocab_size"], H, strict)

    def _attention(self, x, a, L, positions, mask):
        B, T, _ = x.shape
        nq, nkv, d = L["num_attention_heads"], L["num_key_value_heads"], L["head_dim"]
        lin = torch.nn.functional.linear
        q = lin(x, a["q"], a["q_b"]).view(B, T, nq, d).transpose(1, 2)
        k = lin(x, a["k"], a["k_b"]).view(B, T, nkv, d).transpose(1, 2)
        v = lin(x, a["v"], a["v_b"]).view(B, T, nkv, d).transpose(1, 2)
        angles = positions.double()[:, None, :, None] * a["inv_freq"]  # [B, 1, T, d/2]
        cos, sin = (angles.cos() * a["rope_scale"]).float(), (angles.sin() * a["rope_scale"]).float()

        def rotate(t):  # halves rotate as (first, second) pairs
            first, second = t[..., : d // 2], t[..., d // 2 :]
            return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

        q, k = rotate(q), rotate(k)
        k = k.repeat_interleave(nq // nkv, dim=1)
        v = v.repeat_interleave(nq // nkv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, nq, T, T]
        allowed = allowed_keys(positions, mask, window=L["window"])[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        sinks = a["sinks"].view(1, nq, 1, 1).expand(B, nq, T, 1)
        probs = torch.softmax(torch.cat((scores, sinks), dim=-1), dim=-1)[..., :-1]  # the sink takes its share
        out = (probs @ v).transpose(1, 2).reshape(B, T, nq * d)
        return lin(out, a["o"], a["o_b"])

    def _moe(self, x, w, L):
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        logits = flat @ w["router"].T + w["router_b"]  # [N, E]
        top, idx = logits.topk(L["num_experts_per_tok"], dim=-1)
        weights = torch.softmax(top, dim=-1)
        out = torch.zeros_like(flat)
        for n in range(flat.shape[0]):
            for slot in range(idx.shape[1]):
                e = int(idx[n, slot])
                gate_up = flat[n] @ w["gate_up"][e] + w["gate_up_b"][e]
                gate, up = gate_up[::2].clamp(max=self.limit), gate_up[1::2].clamp(-self.limit, self.limit)
                h = (up + 1) * gate * torch.sigmoid(gate * self.alpha)
                out[n] += weights[n, slot] * (h @ w["down"][e] + w["down_b"][e])
        return out.view(B, T, H)

    @torch.no_grad()
    def logits(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        positions = positions_from_mask(attention_mask, B, T)
        h = self.embed[input_ids]
        for L in self.layers:
            if L["attention"] is not None:
                h = h + self._attention(rms_norm(h, L["attention"]["norm"], self.eps), L["attention"], L, positions,
                                        attention_mask)
            if L["mlp"] is not None:
                h = h + self._moe(rms_norm(h, L["mlp"]["norm"], self.eps), L["mlp"], L)
        return torch.nn.functional.linear(rms_norm(h, self.norm, self.eps), self.lm_head)


def load_reference(path, strict=True):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config["model_type"] != "gpt_oss":
        raise NotImplementedError(f"model_type {config['model_type']!r}")
    return GptOssRef(config, _load_tensors(path), strict=strict)
