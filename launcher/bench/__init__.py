"""Benchmarks: scripts that print side-by-side ratios (`python -m launcher.bench.<name>`); results in docs/benchmarks.md."""
