"""HTTP, WebSocket and SSE handlers: thin layers over the hub and the broker."""
