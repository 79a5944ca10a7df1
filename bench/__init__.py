"""qconv's benchmarks: one script per number in bench/RESULTS.md, each run from the repository root as
``python3 -m bench.NAME --help``."""
