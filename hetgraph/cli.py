"""`python -m hetgraph <command>`.

A command is one function `(args) -> exit code` whose docstring's first line is its help, registered
with its arguments in `COMMANDS`. Imports happen inside the command, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from hetgraph.spec import HeteroConfigError

# Exit code for a bad config, checkpoint or command line (argparse uses 2 as well).
EXIT_USAGE = 2


def _arg(*names: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One `add_argument` call, written where the command is registered."""
    return names, kwargs


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    arguments: tuple = ()


def inspect(args: argparse.Namespace) -> int:
    """Per-layer table of a config: blocks, sizes, parameters and KV bytes per token against the homogeneous parent."""
    from hetgraph.inspect import inspect_config

    report = inspect_config(args.path)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0


def passes(args: argparse.Namespace) -> int:
    """The backend's FX passes, in the order they run."""
    from hetgraph.passes import describe_passes

    print(describe_passes())
    return 0


def demo(args: argparse.Namespace) -> int:
    """Build a small heterogeneous model, compile it with backend="hetgraph", compare with eager and Inductor."""
    from hetgraph.demo import run

    run(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        "inspect",
        inspect,
        (
            _arg("path", help="checkpoint directory or config.json (weights are never read)"),
            _arg("--json", action="store_true", help="print the report as JSON"),
        ),
    ),
    Command("passes", passes),
    Command(
        "demo",
        demo,
        (
            _arg("--prompt-len", type=int, default=64, help="prompt tokens (default 64)"),
            _arg("--new-tokens", type=int, default=32, help="greedy tokens decoded (default 32)"),
            _arg("--repeats", type=int, default=5, help="timed repeats per engine (default 5)"),
        ),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    prog = "python -m hetgraph" if os.path.basename(sys.argv[0]) == "__main__.py" else "hetgraph"
    parser = argparse.ArgumentParser(prog=prog, description="Heterogeneous transformer models on stock classes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        summary = (command.run.__doc__ or "").strip().splitlines()[0] if command.run.__doc__ else None
        p = sub.add_parser(command.name, help=summary, description=summary)
        for names, kwargs in command.arguments:
            p.add_argument(*names, **kwargs)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except HeteroConfigError as e:
        # A bad input is the user's to fix: say what, without a traceback.
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
