"""Benchmarks and studies of CflowPlus; run each from the repository root as ``python -m benchmarks.<name>``.

``benchmarks/README.md`` lists them in the order they were done, with their results.
"""
