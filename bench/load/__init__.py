"""The load generator: one process holding every client, a spawned publisher beside it.

    python -m bench.load --scenario S2 --server streamer --url http://127.0.0.1:8080 \
        --pid 1234 --redis-url redis://127.0.0.1:6390/0 --secret ...

prints one JSON line with what it measured (see bench.load.runner.Result).
"""
