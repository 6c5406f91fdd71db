"""Plain reference implementation of (heterogeneous) NemotronH hybrid decoders.

Independent of ``transformers`` modeling code and of ``hetgraph``: torch, safetensors and the
standard library only. Reads ``config.json`` and the safetensors files in NemotronH's stored layout
(``backbone.`` names, one tensor per routed expert; ``model.`` names are read too) and writes the
math out. Each block is ``h + mixer(RMSNorm(h))`` with one mixer per ``layers_block_type`` entry:

* ``linear_attention``: Mamba2 (in_proj -> causal depthwise conv + SiLU -> selective state-space
  recurrence, run token by token -> gated group RMSNorm -> out_proj), padding tokens zeroed;
* ``full_attention``: attention without positional encoding;
* ``mlp``: up -> relu^2 -> down;
* ``moe``: sigmoid router with a score-correction bias and group-limited top-k, relu^2 experts
  weighted by the (normalised, scaled) router scores, plus a shared relu^2 expert.

The state-space step size is softplus(dt + dt_bias) clamped below at ``time_step_min``, as the
stock prefill scan does (its single-token decode step does not clamp; tests keep the clamp idle).

Per-layer overrides (``per_layer_config``, aliases ``num_local_experts`` / ``layer_types`` read
as their real names): attention heads / KV heads / head_dim, ``intermediate_size``,
``n_routed_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
``moe_shared_expert_intermediate_size``, ``mamba_num_heads``, ``mamba_head_dim``,
``ssm_state_size``, ``n_groups``, ``conv_kernel``; ``skip`` (``mixer``, or the block type's name)
makes the block the identity.
"""

import json
import math
import os

import torch
from torch.nn import functional as F

from .llama import ReferenceModel, _load_tensors, per_layer_entries

ALIASES = {"num_local_experts": "n_routed_experts", "layer_types": "layers_block_type"}
LAYER_ATTRS = (
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "mamba_num_heads",
    "mamba_head_dim",
    "ssm_state_size",
    "n_groups",
    "conv_kernel",
)
SKIP_NAMES = {"full_attention": "attention", "linear_attention": "mamba", "mlp": "mlp", "moe": "mlp"}


def rms_norm(x, weight, eps):
    x32 = x.float()
    return (weight.float() * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def relu2(x):
    return F.relu(x).pow(2)


class NemotronHRef(ReferenceModel):
    def __init__(self, cfg, tensors, strict=True):
        cfg = {ALIASES.get(k, k): v for k, v in cfg.items()}
        self.cfg = cfg
        self.eps = cfg["layer_norm_epsilon"]
        self.hidden = H = cfg["hidden_size"]
        self._t = {}
        for name, t in tensors.items():  # stored under `backbone.` (or `model.`) names
            for prefix in ("backbone.", "model."):
                if name.startswith(prefix):
                    name = name[len(prefix):]
            self._t[name] = t
        self._used = set()
        glob = {a: cfg.get(a) for a in LAYER_ATTRS}
        glob["num_key_value_heads"] = glob["num_key_value_heads"] or glob["num_attention_heads"]
        types = cfg["layers_block_type"]
        per_layer = {
            k: {ALIASES.get(a, a): v for a, v in o.items()} for k, o in per_layer_entries(cfg).items()
        }
        self.embed = self._take("embeddings.weight", (cfg["vocab_size"], H))
        self.layers = []
        for i, block_type in enumerate(types):
            over = per_layer.get(i, {})
            unknown = set(over) - set(LAYER_ATTRS) - {"skip"}
            if unknown:
                raise ValueError(f"layer {i}: unknown per-layer keys {sorted(unknown)}")
            skip = set(over.get("skip", ()))
            if skip - {"mixer", SKIP_NAMES[block_type]}:
                raise ValueError(f"layer {i}: skip {sorted(skip)} does not match block type {block_type}")
            L = {a: over.get(a, glob[a]) for a in LAYER_ATTRS}
            L["type"] = None if skip else block_type
            p = f"layers.{i}."
            if L["type"] is not None:
                L["norm"] = self._take(p + "norm.weight", (H,))
                getattr(self, "_load_" + block_type)(L, p + "mixer.")
            self.layers.append(L)
        self._take_head("norm_f.weight", cfg["vocab_size"], H, strict)

    # ---- weights --------------------------------------------------------------------------------

    def _load_full_attention(self, L, p):
        H, nq, nkv, d = self.hidden, L["num_attention_heads"], L["num_key_value_heads"], L["head_dim"]
        L["q"] = self._take(p + "q_proj.weight", (nq * d, H))
        L["k"] = self._take(p + "k_proj.weight", (nkv * d, H))
        L["v"] = self._take(p + "v_proj.weight", (nkv * d, H))
        L["o"] = self._take(p + "o_proj.weight", (H, nq * d))

    def _load_mlp(self, L, p):
        m = L["intermediate_size"]
        L["up"] = self._take(p + "up_proj.weight", (m, self.hidden))
        L["down"] = self._take(p + "down_proj.weight", (self.hidden, m))

    def _load_moe(self, L, p):
        H, E = self.hidden, L["n_routed_experts"]
        m, s = L["moe_intermediate_size"], L["moe_shared_expert_intermediate_size"]
        L["router"] = self._take(p + "gate.weight", (E, H))
        L["bias"] = self._take(p + "gate.e_score_correction_bias", (E,))
        L["experts_up"] = [self._take(f"{p}experts.{e}.up_proj.weight", (m, H)) for e in range(E)]
        L["experts_down"] = [self._take(f"{p}experts.{e}.down_proj.weight", (H, m)) for e in range(E)]
        L["shared_up"] = self._take(p + "shared_experts.up_proj.weight", (s, H))
        L["shared_down"] = self._take(p + "shared_experts.down_proj.weight", (H, s))

    def _load_linear_attention(self, L, p):
        heads, dim, n, groups, k = (L[a] for a in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
                                                    "conv_kernel"))
        inner = heads * dim
        conv = inner + 2 * groups * n
        L["in"] = self._take(p + "in_proj.weight", (inner + conv + heads, self.hidden))
        L["conv_w"] = self._take(p + "conv1d.weight", (conv, 1, k))
        L["conv_b"] = self._take(p + "conv1d.bias", (conv,)) if self.cfg.get("use_conv_bias", True) else None
        L["dt_bias"] = self._take(p + "dt_bias", (heads,))
        L["A_log"] = self._take(p + "A_log", (heads,))
        L["D"] = self._take(p + "D", (heads,))
        L["gnorm"] = self._take(p + "norm.weight", (inner,))
        L["out"] = self._take(p + "out_proj.weight", (self.hidden, inner))

    # ---- mixers ---------------------------------------------------------------------------------

    def _full_attention(self, x, L, mask):
        B, T, _ = x.shape
        nq, nkv, d = L["num_attention_heads"], L["num_key_value_heads"], L["head_dim"]
        q = F.linear(x, L["q"]).view(B, T, nq, d).transpose(1, 2)
        k = F.linear(x, L["k"]).view(B, T, nkv, d).transpose(1, 2).repeat_interleave(nq // nkv, dim=1)
        v = F.linear(x, L["v"]).view(B, T, nkv, d).transpose(1, 2).repeat_interleave(nq // nkv, dim=1)
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, :]
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(allowed[:, None].any(-1, keepdim=True), probs, torch.zeros_like(probs))
        return F.linear((probs @ v).transpose(1, 2).reshape(B, T, nq * d), L["o"])

    def _mlp(self, x, L, mask):
        return F.linear(relu2(F.linear(x, L["up"])), L["down"])

    def _moe(self, x, L, mask):
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        E, k = L["n_routed_experts"], L["num_experts_per_tok"]
        groups, keep = self.cfg.get("n_group", 1), self.cfg.get("topk_group", 1)
        scores = torch.sigmoid(flat @ L["router"].T)  # [N, E]
        choice = scores + L["bias"]
        group_scores = choice.view(-1, groups, E // groups).topk(2, dim=-1).values.sum(-1)  # [N, groups]
        kept = torch.zeros_like(group_scores).scatter(1, group_scores.topk(keep, dim=-1).indices, 1.0)
        kept = kept.repeat_interleave(E // groups, dim=1).bool()
        idx = choice.masked_fill(~kept, float("-inf")).topk(k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.cfg.get("norm_topk_prob", True):
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.cfg.get("routed_scaling_factor", 1.0)
        out = torch.zeros_like(flat)
        for n in range(flat.shape[0]):
            for slot in range(k):
                e = int(idx[n, slot])
                out[n] += weights[n, slot] * (L["experts_down"][e] @ relu2(L["experts_up"][e] @ flat[n]))
        shared = F.linear(relu2(F.linear(flat, L["shared_up"])), L["shared_down"])
        return (out + shared).view(B, T, H)

    def _linear_attention(self, x, L, mask):
        B, T, _ = x.shape
        heads, dim, n, groups, k = (L[a] for a in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
                                                    "conv_kernel"))
        inner = heads * dim
        real = torch.ones(B, T) if mask is None else mask.float()
        proj = F.linear(x * real[..., None], L["in"])
        z, xbc, dt = proj.split([inner, inner + 2 * groups * n, heads], dim=-1)
        # Causal depthwise convolution over time (zeros before the first token), then SiLU.
        xbc = F.conv1d(F.pad(xbc.transpose(1, 2), (k - 1, 0)), L["conv_w"], L["conv_b"], groups=xbc.shape[-1])
        xbc = F.silu(xbc.transpose(1, 2)) * real[..., None]
        xs, Bm, Cm = xbc.split([inner, groups * n, groups * n], dim=-1)
        xs = xs.view(B, T, heads, dim)
        per_group = heads // groups
        Bm = Bm.view(B, T, groups, n).repeat_interleave(per_group, dim=2)  # [B, T, heads, n]
        Cm = Cm.view(B, T, groups, n).repeat_interleave(per_group, dim=2)
        dt = F.softplus(dt + L["dt_bias"]).clamp(min=self.cfg.get("time_step_min", 0.001))  # [B, T, heads]
        A = -torch.exp(L["A_log"])
        state = torch.zeros(B, heads, dim, n)
        ys = []
        for t in range(T):
            decay = torch.exp(dt[:, t] * A)[..., None, None]
            state = state * decay + (dt[:, t, :, None, None] * xs[:, t, :, :, None] * Bm[:, t, :, None, :])
            ys.append((state * Cm[:, t, :, None, :]).sum(-1) + L["D"][:, None] * xs[:, t])
        y = torch.stack(ys, dim=1).reshape(B, T, inner)
        # Gated RMSNorm, normalised within each of the n_groups groups.
        y = y * F.silu(z)
        y = y.view(B, T, groups, inner // groups)
        y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = L["gnorm"] * y.reshape(B, T, inner)
        return F.linear(y, L["out"])

    @torch.no_grad()
    def logits(self, input_ids, attention_mask=None):
        h = self.embed[input_ids]
        for L in self.layers:
            if L["type"] is not None:
                h = h + getattr(self, "_" + L["type"])(rms_norm(h, L["norm"], self.eps), L, attention_mask)
        return F.linear(rms_norm(h, self.norm, self.eps), self.lm_head)


def load_reference(path, strict=True):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config["model_type"] != "nemotron_h":
        raise NotImplementedError(f"model_type {config['model_type']!r}")
    return NemotronHRef(config, _load_tensors(path), strict=strict)
