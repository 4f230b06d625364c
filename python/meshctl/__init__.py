"""meshctl: a service mesh. This package holds its CLI, sidecar agent and control plane."""


def __getattr__(name: str) -> str:
    # __version__ is looked up on first use: importlib.metadata would otherwise add ~2 MB to
    # every process that imports meshctl, the long-running sidecar included.
    if name != "__version__":
        raise AttributeError(f"module 'meshctl' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshctl")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"
