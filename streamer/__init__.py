"""streamer: live progress of background jobs over WebSocket and Server-Sent Events."""

__version__ = "0.1.0"
