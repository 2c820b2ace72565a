"""The web dashboard (server-rendered, no JavaScript): coordinator/web/dashboard.py."""
