"""Benchmarks (``make bench`` runs ``.venv/bin/python -m bench.run`` from the repository root)."""
