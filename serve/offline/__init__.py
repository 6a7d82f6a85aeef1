"""Offline tools: training, evaluation, benchmarks and demos; never imported by a server."""
