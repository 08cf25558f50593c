"""Throughput and memory harnesses: `python -m benchmarks.NAME`. Results land in benchmarks/results/."""
