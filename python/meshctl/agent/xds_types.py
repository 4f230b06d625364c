"""Finds Envoy API message types by type URL, importing their xds-protos modules on demand."""

import importlib
import pkgutil
from typing import Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

# Only these top-level packages (xds-protos' own) are ever imported because a config named them:
# a type URL is user input, and importing arbitrary modules by name could run their code.
_API_PACKAGES = frozenset({"envoy", "xds", "udpa", "validate"})


def find_message_type(type_url: str) -> Descriptor | None:
    """The descriptor for `type.googleapis.com/<full name>` (or a bare full name), or None."""
    full_name = type_url.rpartition("/")[2]
    descriptor = _registered(full_name)
    if descriptor is None and _import_package_of(full_name):
        descriptor = _registered(full_name)
    return descriptor


def message_class(descriptor: Descriptor) -> type[Message]:
    """The generated Python class for `descriptor`."""
    return message_factory.GetMessageClass(descriptor)


def import_types_named_in(document: Any) -> None:
    """Import the message type of every "@type" in a parsed YAML/JSON document.

    json_format resolves an Any's "@type" only among types already imported, so a document's
    typed_config extensions must be imported before it is parsed. Unknown ones are left for the
    parse to report, with their path.
    """
    if isinstance(document, dict):
        type_url = document.get("@type")
        if isinstance(type_url, str):
            find_message_type(type_url)
        for value in document.values():
            import_types_named_in(value)
    elif isinstance(document, list):
        for item in document:
            import_types_named_in(item)


def _registered(full_name: str) -> Descriptor | None:
    try:
        return descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return None


def _import_package_of(full_name: str) -> bool:
    # A message's proto package is a Python package of *_pb2 modules, but which module holds it
    # is not in its name (DownstreamTlsContext lives in tls_pb2), so the whole package is
    # imported. The longest importable prefix is the package; nested messages add components.
    parts = full_name.split(".")
    if parts[0] not in _API_PACKAGES or not all(part.isidentifier() for part in parts):
        return False
    for end in range(len(parts) - 1, 1, -1):
        package_name = ".".join(parts[:end])
        try:
            package = importlib.import_module(package_name)
        except ImportError:
            continue
        for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
            if module.name.endswith("_pb2"):
                importlib.import_module(f"{package_name}.{module.name}")
        return True
    return False
