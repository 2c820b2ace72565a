"""The relay (DERP-style, DESIGN.md §1): hub, transports (HTTP Upgrade front, WebSocket), tickets, feed."""
