"""Workload identity: SPIFFE IDs, the control plane's certificate authority, and join tokens."""
