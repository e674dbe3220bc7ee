"""Benchmarks for optim_zoo: speed, memory and convergence studies (see README.md)."""
