"""Benchmarks shipped with shoal (``shoal bench ...``); thin runners live in ``benchmarks/``."""
