"""Run code in a fresh interpreter, where import order is real (nothing imported by the test run)."""

from __future__ import annotations

import os
import subprocess
import sys

# tests/, so that the code can import `support` and `references` as the test modules do.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str) -> None:
    """Run `code` in a fresh interpreter; fail with its output if it fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
