"""Helpers for the ADS tests: mesh snapshots, a raw ADS test client, and running the server and data planes."""
