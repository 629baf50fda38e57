"""Benchmarks against the field. Run from a source checkout: `fedcondense bench` / `make bench`."""
