"""Hostile input never crashes a connection handler or the worker; the server keeps
serving the next client. One module per layer: the WebSocket command parser
(`test_commands`), SSE framing (`test_sse_framing`), WebSocket frames
(`test_websocket_frames`), HTTP requests (`test_http_requests`), and published events
end to end (`test_events`)."""
