"""Upstream servers the end-to-end tests run as subprocesses; each prints `READY <port>` once it listens."""
