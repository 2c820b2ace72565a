"""HTTP routers: node-facing API (TCP listener) and the admin API (unix socket only)."""
