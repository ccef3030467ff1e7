"""Benchmarks: each `bench/<name>.py` prints its figures with a baseline from the same run."""
