"""Shared helpers for the end-to-end tests: ports, processes, bootstraps, data planes and clients."""
