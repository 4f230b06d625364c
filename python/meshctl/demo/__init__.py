"""`meshctl demo`: a bookinfo-like mesh on this machine (see runner), and its services (apps)."""
