"""Locust load tests for qaserve, their latency constraints, and a plain baseline to beat.

`qaserve loadtest` runs a profile against a server (started for the run, or `--url` on
loopback) and checks `constraints.yaml`; `qaserve loadtest-compare` runs the same profile
against the Ray Serve graph and a one-process FastAPI baseline, alternating.
"""
