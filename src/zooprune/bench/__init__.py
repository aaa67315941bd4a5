"""Benchmarks: speed of the selection kernels and of pruned models end to end."""
