"""Keep pytest away from the benchmark scripts here: they are standalone, slow, and build
multi-GB checkpoints. Run them directly (see README.md)."""

collect_ignore_glob = ["bench_*.py"]
