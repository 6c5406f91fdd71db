"""`hetgraph.runtime`: what runs after export needs torch alone, and reads the format versions it knows.

The programs here are tiny `torch.export` programs with hand-written metadata; tests/test_export.py
runs the runtime on real exported models.
"""

from __future__ import annotations

import json
import re
import textwrap
import types

import pytest
import torch

import hetgraph.runtime
from hetgraph.runtime import FORMAT_VERSION, METADATA, SUPPORTED_VERSIONS, read_metadata
from support.fresh_python import run_python


def test_runtime_imports_only_torch():
    # Loaded from its file, not as `hetgraph.runtime`: that import runs hetgraph/__init__.py first,
    # which imports everything, so sys.modules would say nothing about runtime.py's own imports.
    # Executing the file alone runs exactly its imports (an ast scan would miss indirect ones).
    run_python(textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("copied_runtime", {hetgraph.runtime.__file__!r})
        runtime = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runtime)
        assert callable(runtime.generate_with_exported) and callable(runtime.read_metadata)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("hetgraph", "transformers"))
        assert not leaked, leaked
        """
    ))


def tiny_program(path, meta: dict | None) -> str:
    """A `.pt2` of a 2x2 linear layer, with `meta` as its hetgraph metadata (None: no metadata file)."""
    ep = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    extra = {} if meta is None else {METADATA: json.dumps(meta)}
    torch.export.save(ep, str(path), extra_files=extra)
    return str(path)


def test_read_metadata_reads_each_supported_version(tmp_path):
    assert FORMAT_VERSION == max(SUPPORTED_VERSIONS)
    current = tiny_program(tmp_path / "v1.pt2", {"format_version": FORMAT_VERSION, "batch_size": 2})
    assert read_metadata(current) == {"format_version": FORMAT_VERSION, "batch_size": 2}
    # Written before the field existed: format 0, read, and said so.
    older = tiny_program(tmp_path / "v0.pt2", {"batch_size": 2})
    assert read_metadata(older) == {"format_version": 0, "batch_size": 2}
    assert read_metadata(tiny_program(tmp_path / "none.pt2", None)) == {}


def test_read_metadata_refuses_a_newer_format(tmp_path):
    newer = tiny_program(tmp_path / "new.pt2", {"format_version": FORMAT_VERSION + 1, "batch_size": 2})
    said = f"new.pt2: hetgraph metadata format_version {FORMAT_VERSION + 1}; "
    said += f"this hetgraph reads versions {list(SUPPORTED_VERSIONS)}"
    with pytest.raises(ValueError, match=re.escape(said)):
        read_metadata(newer)
    with pytest.raises(ValueError, match=r"format_version"):  # generate_with_exported reads it first
        hetgraph.runtime.generate_with_exported(newer, newer, torch.zeros(2, 3, dtype=torch.long), 2)
    # A loaded package says it through get_metadata().
    package = types.SimpleNamespace(get_metadata=lambda: {METADATA: json.dumps({"format_version": 99})})
    with pytest.raises(ValueError, match=r"the given SimpleNamespace: hetgraph metadata format_version 99"):
        read_metadata(package)

