"""The mesh's web dashboard: its services and the traffic between them, from the control plane's
registry and the sidecars' Istio metrics (`meshctl dashboard`, and the demo's)."""
