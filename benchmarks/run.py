"""Benchmarks entry point; the code lives in `hetgraph.bench` so `python -m hetgraph bench` runs it too.

    python benchmarks/run.py --preset puzzle --out benchmarks/results/<machine>
    python benchmarks/run.py --preset all --quick --out /tmp/bench
"""

from hetgraph.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
