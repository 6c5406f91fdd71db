"""The driver: each (engine, repeat) in a fresh process with an empty Inductor cache, engines
interleaved; figures are medians over repeats, with the ratios between engines."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict

from hetgraph.bench.presets import make_preset
from hetgraph.bench.roofline import achieved_gbs, ideal_and_static_kv

METRICS = (
    "compile_prefill_s",
    "compile_decode_s",
    "tracing_s",
    "aot_s",
    "inductor_s",
    "prefill_short_ms",
    "prefill_long_ms",
    "decode_ms_per_token",
    "peak_rss_mb",
    "graphs_compiled",
)
_BYTES = ("kv_bytes", "weight_bytes", "streamed_bytes_per_token")  # the same in every run of an engine
_RATIOS = ("prefill_short_ms", "prefill_long_ms", "decode_ms_per_token", "compile_prefill_s")


def exception_line(stderr: str) -> str:
    """The raised exception's own line of a worker's traceback (not torch's hints printed after it)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*", line)]
    return (raised or lines or ["(no output)"])[-1]


def fresh_process(args: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
    """`python *args` in a fresh process with an empty Inductor cache (so its compiles are cold)."""
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def spawn_worker(job: dict, timeout: int = 1800) -> dict:
    """`hetgraph.bench.worker.run_worker(job)` in a fresh process; an error result if it fails."""
    out = fresh_process(["-m", "hetgraph.bench", "--worker", json.dumps(job)], timeout)
    if out.returncode != 0:
        return {"engine": job["engine"], "preset": job["preset"], "error": exception_line(out.stderr)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[0].get("error")}
    s = {m: statistics.median(r[m] for r in ok) for m in METRICS}
    s.update({k: ok[0][k] for k in _BYTES})
    s["achieved_gbs"] = achieved_gbs(s["streamed_bytes_per_token"], s["decode_ms_per_token"])
    return s


def _derived(summary: dict) -> dict:
    def ok(engine):
        return engine in summary and "error" not in summary[engine]

    derived = {}
    het, parent, ind = summary.get("hetgraph"), summary.get("hetgraph-parent"), summary.get("inductor")
    if ok("hetgraph") and ok("hetgraph-parent"):
        time_ratio = het["decode_ms_per_token"] / parent["decode_ms_per_token"]
        byte_ratio = het["weight_bytes"] / parent["weight_bytes"]
        derived["realized_savings"] = time_ratio / byte_ratio
    if ok("hetgraph") and ok("inductor"):
        derived.update({f"hetgraph/inductor {m}": het[m] / ind[m] for m in _RATIOS})
    return derived


def run_preset(name: str, args, progress) -> dict:
    """All repeats of all `args.engines` on one preset; `progress` is a tqdm bar, one step per run."""
    preset = make_preset(name, args.scale)
    runs = {e: [] for e in args.engines}
    for _ in range(args.repeats):
        for engine in args.engines:  # interleaved
            job = dict(
                engine=engine,
                preset=name,
                scale=args.scale,
                dtype=args.dtype,
                device=args.device,
                mode=args.mode,
                timing_repeats=args.timing_repeats,
            )
            progress.set_postfix_str(f"{name}/{engine}")
            runs[engine].append(spawn_worker(job))
            progress.update(1)
    summary = {engine: _summary(results) for engine, results in runs.items()}
    kv = ideal_and_static_kv(preset, args.dtype)
    return {"preset": asdict(preset), "runs": runs, "summary": summary, "kv": kv, "derived": _derived(summary)}
