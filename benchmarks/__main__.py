"""Run every benchmark module (`benchmarks/bench_*.py`) in quick mode, one after another.

    python -m benchmarks            # all, quick
    python -m benchmarks extract    # only bench_extract, quick
    python -m benchmarks --full     # all, full size (slow on a CPU)
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import benchmarks


def _modules(only: list[str]) -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    if only:
        wanted = {f"bench_{name.removeprefix('bench_')}" for name in only}
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}; have: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    return names


def main(argv: list[str]) -> int:
    full = "--full" in argv
    only = [a for a in argv if not a.startswith("-")]
    failed = []
    for name in _modules(only):
        print(f"\n=== {name} ({'full' if full else 'quick'}) ===", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        code = module.main([] if full else ["--quick"])
        print(f"=== {name}: exit {code}, {time.perf_counter() - start:.1f} s ===", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
