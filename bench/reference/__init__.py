"""The reference server the benchmarks compare streamer with (see app.py)."""
