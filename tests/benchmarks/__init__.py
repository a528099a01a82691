"""Benchmarks for issue 5: python tests/benchmarks/run.py [--quick] [--json FILE]."""
