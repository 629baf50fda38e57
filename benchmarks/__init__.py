"""Benchmarks against the field (issue 6). Run from a source checkout: `fedcondense bench` / `make bench`."""
