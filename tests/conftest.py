"""Shared fixtures: dynamo reset around every test, and tiny random checkpoints on disk.

Imports: test modules import shared code as `support.*` and the independent references as
`references.*`; pytest's default (prepend) import mode puts this folder, tests/, on sys.path because
it has no __init__.py. Test modules never import each other.
"""

from __future__ import annotations

import pytest
import torch

import hetgraph
from support.models import hetero_config


@pytest.fixture(autouse=True)
def _reset_dynamo():
    # Compiled code and guards from one test must not leak into (or be reused by) the next.
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """`make(config_dict, seed=0) -> path`: a random hetgraph model saved by transformers' own `save_pretrained`.

    Session-scoped so module-scoped fixtures can use it; every call writes a fresh directory.
    """

    def make(config_dict: dict, seed: int = 0) -> str:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = hetgraph.from_config(config_dict)
        path = tmp_path_factory.mktemp(f"ckpt_{config_dict.get('model_type', 'none')}")
        model.save_pretrained(path)
        return str(path)

    return make


@pytest.fixture(scope="session")
def case_checkpoint(checkpoint):
    """`path(family)`: the checkpoint of `hetero_config(family)` (seed 0), written once per session
    and shared by every module that tests the case; tests only read it."""
    paths: dict[str, str] = {}

    def path(family: str) -> str:
        if family not in paths:
            paths[family] = checkpoint(hetero_config(family))
        return paths[family]

    return path
