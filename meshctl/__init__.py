"""meshctl: a service mesh. This package holds its CLI, sidecar agent and control plane."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("meshctl")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
