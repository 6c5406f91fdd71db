"""`python -m hetgraph demo`: build a small heterogeneous model, compile it with backend="hetgraph",
show what the passes did per layer, check it against eager, and time it against eager and Inductor."""

from __future__ import annotations

import statistics
import time

import torch

import hetgraph
from hetgraph.bench.worker import median_ms

# A Puzzle-like stack: attention removed from a third of the layers, MLP widths from 0.5x to 2x,
# two sliding-window layers and one chunked layer, one layer pruned to fewer heads.
DEMO_CONFIG = dict(
    model_type="llama",
    hidden_size=256,
    num_hidden_layers=8,
    vocab_size=2048,
    intermediate_size=512,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    per_layer_config={
        1: {"skip": ["attention"], "intermediate_size": 256},
        2: {"sliding_window": 32},
        3: {"skip": ["attention"], "intermediate_size": 1024},
        4: {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 384},
        5: {"skip": ["attention", "mlp"]},
        6: {"sliding_window": 32, "intermediate_size": 768},
        7: {"attention_chunk_size": 64},
    },
)


def _engines(model):
    return {
        "eager": model.forward,
        "inductor": torch.compile(model.forward, backend="inductor", fullgraph=True),
        "hetgraph": torch.compile(model.forward, backend="hetgraph", fullgraph=True),
    }


def _decode_loop(model, forward, prompt, new_tokens, cache):
    cache.reset()
    logits = forward(input_ids=prompt, cache=cache).logits[:, -1]
    token = logits.argmax(-1, keepdim=True)
    for _ in range(new_tokens - 1):
        token = forward(input_ids=token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    return token


def run(prompt_len: int = 64, new_tokens: int = 32, repeats: int = 5) -> None:
    torch.manual_seed(0)
    print(f"hetgraph {hetgraph.__version__} / torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    model = hetgraph.from_config(DEMO_CONFIG)
    prompt = torch.randint(0, DEMO_CONFIG["vocab_size"], (1, prompt_len))
    print("1. The model (stock LlamaForCausalLM, built layer by layer):\n")
    from hetgraph.inspection import inspect_config

    print(inspect_config(model.config).to_text(), "\n")

    print("2. What the hetgraph passes did to the prefill graph, per layer:\n")
    print(hetgraph.explain(model, prompt), "\n")

    print("3. Correctness and speed (median of interleaved runs):\n")
    engines = _engines(model)
    cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=prompt_len + new_tokens)
    with torch.no_grad():
        eager_logits = model(prompt).logits
        compile_s = {}
        for name, fwd in engines.items():
            start = time.perf_counter()
            fwd(input_ids=prompt)
            _decode_loop(model, fwd, prompt, 2, cache)
            compile_s[name] = time.perf_counter() - start
        diffs = {n: (f(input_ids=prompt).logits - eager_logits).abs().max().item() for n, f in engines.items()}
        prefill = {n: [] for n in engines}
        decode = {n: [] for n in engines}
        for _ in range(repeats):
            for name, fwd in engines.items():
                prefill[name].append(median_ms(lambda: fwd(input_ids=prompt), 1))
                start = time.perf_counter()
                _decode_loop(model, fwd, prompt, new_tokens, cache)
                total = (time.perf_counter() - start) * 1e3
                decode[name].append((total - prefill[name][-1]) / (new_tokens - 1))
    rows = [("engine", "first call + compile s", "max |logits - eager|", "prefill ms", "decode ms/token")]
    for name in engines:
        rows.append(
            (
                name,
                f"{compile_s[name]:.1f}",
                f"{diffs[name]:.2e}",
                f"{statistics.median(prefill[name]):.2f}",
                f"{statistics.median(decode[name]):.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    eager_p, het_p = statistics.median(prefill["eager"]), statistics.median(prefill["hetgraph"])
    ind_d, het_d = statistics.median(decode["inductor"]), statistics.median(decode["hetgraph"])
    print(
        f"\n  hetgraph vs eager prefill: {eager_p / het_p:.2f}x faster; "
        f"hetgraph / inductor decode time: {het_d / ind_d:.2f} (1.00 = same)"
    )
    print(
        "  (Timings on a shared CPU are noisy; the ratios come from one interleaved run. "
        "benchmarks/run.py measures properly.)"
    )
