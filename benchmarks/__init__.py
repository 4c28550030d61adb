"""Speed and memory benchmarks. Each `bench_*.py` module has `main(argv) -> int` and prints ratios against a
reference method measured in the same run. `python -m benchmarks` (make bench) runs them all in quick mode."""
