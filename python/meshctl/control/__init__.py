"""The control plane: the resource store, its REST API and token auth, and (alongside) the xDS server."""
