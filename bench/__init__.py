"""psjobs benchmarks against its peers: ``python -m bench [--quick] [area ...]`` (see README)."""
