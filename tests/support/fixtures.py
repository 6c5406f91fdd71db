"""The one fixture factory for tests on the tiny case models of `support.models`."""

from __future__ import annotations

from typing import Iterable

import pytest

import hetgraph
from references import load_reference


def model_fixtures(families: str | Iterable[str]):
    """Module-scoped fixtures `family`, `ckpt`, `model`, `ref` for a test module's case models.

    `family` is the one model_type given as a string, or one parameter per model_type of `families`
    (test ids `test_x[llama]`); `ckpt` its case checkpoint (`hetero_config(family)`, written once per
    session: tests only read it); `model` that checkpoint loaded by hetgraph; `ref` its independent
    reference. Bind them at module level, under these names, for pytest to find:

        family, ckpt, model, ref = model_fixtures(LLAMA_FAMILIES)
    """
    if isinstance(families, str):
        name = families

        @pytest.fixture(scope="module")
        def family():
            return name

    else:

        @pytest.fixture(scope="module", params=list(families))
        def family(request):
            return request.param

    @pytest.fixture(scope="module")
    def ckpt(family, case_checkpoint):
        return case_checkpoint(family)

    @pytest.fixture(scope="module")
    def model(ckpt):
        return hetgraph.from_pretrained(ckpt)

    @pytest.fixture(scope="module")
    def ref(ckpt):
        return load_reference(ckpt)

    return family, ckpt, model, ref
