"""Peer quantizers the benchmarks compare against, each driven in its own virtual environment."""
