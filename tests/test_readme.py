"""The README's Python snippets, run as written, in order, in one namespace.

The snippets leave `input_ids`, `max_new_tokens`, `CKPT`, `other_config` and `parent_config` to the
reader; the test supplies them. The device-map snippet needs two GPUs and runs only where there are
(its maps are tested with pretend GPUs in tests/test_placement.py). Slow:
the snippets compile for generation and write AOTInductor packages (`bash scripts/test.sh -m slow`).
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import hetgraph

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_the_snippets_this_test_runs():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    assert "hetgraph.from_config(config)" in blocks[0]
    assert any('hetgraph.export(model, "model.pt2"' in b for b in blocks[1:])
    assert any("per_layer_config=plan" in b for b in blocks) and any("lora_targets" in b for b in blocks)


@pytest.mark.slow
def test_readme_snippets_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippets write ckpt/, model.pt2 and out/ where they run
    torch.manual_seed(0)
    namespace = {"input_ids": torch.randint(0, 2048, (1, 8)), "max_new_tokens": 6, "CKPT": "ckpt"}
    multi_gpu = [b for b in python_blocks(README.read_text()) if 'device_map="auto"' in b]
    assert len(multi_gpu) == 1
    for block in python_blocks(README.read_text()):
        if block in multi_gpu and torch.cuda.device_count() < 2:
            continue
        if "config" in namespace:  # what the latency-table snippet leaves to the reader
            namespace.setdefault("other_config", namespace["config"])
            namespace.setdefault("parent_config", {k: v for k, v in namespace["config"].items() if k != "per_layer_config"})
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "model.pt2").is_file() and torch.export.load("model.pt2") is not None
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"prefill.pt2", "decode.pt2", "prefill.aoti.pt2"}
    model, input_ids = namespace["model"], namespace["input_ids"]
    # The last snippet's loop equals greedy generate, as its comment says.
    expected = model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(namespace["ids"], expected)
    assert isinstance(namespace["table"], hetgraph.LatencyTable) and (tmp_path / "table.json").is_file()
