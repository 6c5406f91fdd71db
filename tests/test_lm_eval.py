"""lm-evaluation-harness through hetgraph: the "hetgraph" model type loads a path with
`hetgraph.from_pretrained` (a checkpoint stock `AutoConfig` refuses on purpose), on a tiny local
multiple-choice task (no downloads). The oracle: each choice's log-likelihood computed here from
the model's logits, and the accuracy that follows."""

from __future__ import annotations

import json
import os
import pathlib
import shlex

import pytest
import torch

import hetgraph
from hetgraph.cli import main as cli_main
from support.models import VOCAB, hetero_config

lm_eval = pytest.importorskip("lm_eval")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(VOCAB - 2)]
DOCS = [
    {"question": "w1 w2 w3", "choices": ["w4", "w5 w6", "w7"], "answer": 0},
    {"question": "w8 w9", "choices": ["w10", "w11"], "answer": 1},
    {"question": "w12", "choices": ["w13 w14", "w15", "w16 w17 w18"], "answer": 2},
    {"question": "w19 w20 w21 w22", "choices": ["w23", "w24"], "answer": 0},
]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def setup(checkpoint, tmp_path_factory):
    """(checkpoint with a word-level tokenizer, task directory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = checkpoint(hetero_config("llama"))
    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)
    tasks = tmp_path_factory.mktemp("tasks")
    data = tasks / "tiny.json"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=data))
    return path, str(tasks)


def _expected_accuracy(path: str) -> float:
    """Per doc: log p(choice | question) summed over the choice's tokens; the argmax against the answer."""
    model = hetgraph.from_pretrained(path)
    ids = {w: i + 2 for i, w in enumerate(WORDS)}
    correct = []
    for doc in DOCS:
        context = [ids[w] for w in doc["question"].split()]
        scores = []
        for choice in doc["choices"]:
            cont = [ids[w] for w in choice.split()]
            seq = torch.tensor([context + cont])
            with torch.no_grad():
                logp = model(seq).logits.log_softmax(-1)[0]
            scores.append(sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(cont)))
        correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return sum(correct) / len(correct)


def _written_accuracy(out_dir) -> float:
    """The tiny task's accuracy from the one results file lm-eval wrote under out_dir."""
    (result,) = [os.path.join(d, f) for d, _, fs in os.walk(out_dir) for f in fs if f.endswith(".json")]
    with open(result) as f:
        return json.load(f)["results"]["tiny_mc"]["acc,none"]


def _guarded(path: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except Exception:
        return True
    return False


def test_the_hetgraph_model_type_loads_a_path_and_scores_like_the_model(setup):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import hetgraph.lm_eval  # noqa: F401  registers "hetgraph"

    path, tasks = setup
    assert _guarded(path), "the case checkpoint should be one stock AutoConfig refuses (skip blocks, windows)"
    out = simple_evaluate(model="hetgraph", model_args=f"pretrained={path},dtype=float32", device="cpu",
                          tasks=["tiny_mc"], task_manager=TaskManager(include_path=tasks), batch_size=2)  # fmt: skip
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(_expected_accuracy(path))


def test_python_m_hetgraph_lm_eval_runs_lm_evals_command_line(setup, tmp_path):
    path, tasks = setup
    rc = cli_main(["lm-eval", "--model", "hetgraph", "--model_args", f"pretrained={path},dtype=float32",
                   "--device", "cpu", "--tasks", "tiny_mc", "--include_path", tasks, "--batch_size", "2",
                   "--output_path", str(tmp_path / "out")])  # fmt: skip
    assert rc == 0
    assert _written_accuracy(tmp_path / "out") == pytest.approx(_expected_accuracy(path))


def test_the_readme_command_runs_with_a_local_task(setup, tmp_path):
    """The README's `python -m hetgraph lm-eval ...` line as written, with its checkpoint, task and dtype
    swapped for this test's (hellaswag needs a download)."""
    path, tasks = setup
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith("python -m hetgraph lm-eval ")]
    argv = shlex.split(line)[3:]
    argv[argv.index("--tasks") + 1] = "tiny_mc"
    model_args = argv.index("--model_args") + 1
    argv[model_args] = argv[model_args].replace("CKPT", path).replace("bfloat16", "float32")
    argv += ["--device", "cpu", "--include_path", tasks, "--output_path", str(tmp_path / "out")]
    assert cli_main(argv) == 0
    assert _written_accuracy(tmp_path / "out") == pytest.approx(_expected_accuracy(path))
