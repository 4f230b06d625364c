"""Reads Envoy-style bootstrap files (YAML or JSON) and xDS resources into serialized protobufs."""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from google.protobuf import json_format
from google.protobuf.message import Message

from meshctl.agent import field_errors, xds_types


class BootstrapError(ValueError):
    """A bootstrap or resource could not be read. str() names the file or resource, then the field."""


def load_bootstrap_file(path: str | Path) -> bytes:
    """Read a bootstrap file and return it as a serialized envoy.config.bootstrap.v3.Bootstrap.

    The format is JSON for `.json` files and YAML for `.yaml`/`.yml`; any other name is JSON when
    the text starts with `{`, else YAML.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise BootstrapError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise BootstrapError(
            f"{path}: not UTF-8 text: {error.reason} at byte {error.start}"
        ) from None
    return _serialize(Bootstrap, _parse_document(text, path), str(path))


def bootstrap_from_dict(document: Mapping[str, Any]) -> bytes:
    """Serialize a bootstrap given as a dict (the parsed form of a bootstrap file)."""
    return _serialize(Bootstrap, document, "bootstrap")


def resource_to_bytes(type_url: str, document: Mapping[str, Any]) -> bytes:
    """Serialize one xDS resource given as a dict, e.g. a RouteConfiguration, as `type_url`."""
    descriptor = xds_types.find_message_type(type_url)
    if descriptor is None:
        raise BootstrapError(f'unknown xDS resource type "{type_url}"')
    name = document.get("name") if isinstance(document, Mapping) else None
    label = f'{descriptor.name} "{name}"' if name else descriptor.name
    return _serialize(xds_types.message_class(descriptor), document, label)


def _parse_document(text: str, path: Path) -> Any:
    if not text.strip():
        raise BootstrapError(f"{path}: the file is empty")
    as_json = path.suffix == ".json" or (
        path.suffix not in (".yaml", ".yml") and text.lstrip().startswith("{")
    )
    return _parse_json(text, path) if as_json else _parse_yaml(text, path)


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_json_keys)
    except json.JSONDecodeError as error:
        raise BootstrapError(
            f"{path}: line {error.lineno}, column {error.colno}: invalid JSON: {error.msg}"
        ) from None
    except _DuplicateKey as error:
        raise BootstrapError(f"{path}: invalid JSON: {error}") from None


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a second "listeners" silently replacing the
    # first is a config bug, so it is refused as it is in YAML below.
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise _DuplicateKey(f'duplicate key "{key}"')
        mapping[key] = value
    return mapping


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML otherwise lets the last one win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_seen: dict[str, int] = {}
        for key_node, _ in node.value:
            # A merge key (<<) may legitimately repeat keys it brings in; only plain keys count.
            if (
                not isinstance(key_node, yaml.ScalarNode)
                or key_node.tag == "tag:yaml.org,2002:merge"
            ):
                continue
            if key_node.value in first_seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f'duplicate key "{key_node.value}"'
                    f" (first at line {first_seen[key_node.value] + 1})",
                    key_node.start_mark,
                )
            first_seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        document = yaml.load(text, Loader=_StrictYamlLoader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = error.problem or error.context or "malformed"
        context = f" ({error.context})" if error.context and error.problem else ""
        raise BootstrapError(f"{path}: {where}invalid YAML: {problem}{context}") from None
    except yaml.YAMLError as error:
        raise BootstrapError(f"{path}: invalid YAML: {error}") from None
    if document is None:
        raise BootstrapError(f"{path}: the file has no YAML content, only comments or null")
    return document


def _serialize(message_type: type[Message], document: Any, source: str) -> bytes:
    if not isinstance(document, Mapping):
        # json_format would take a list as an empty message, so the top level is checked here.
        raise BootstrapError(
            f"{source}: the top level must be a mapping of {message_type.DESCRIPTOR.name}"
            f" fields, not {field_errors.describe_value(document)}"
        )
    xds_types.import_types_named_in(document)
    message = message_type()
    try:
        json_format.ParseDict(document, message)
    except json_format.ParseError as error:
        field, reason = field_errors.locate(message_type.DESCRIPTOR, document, error)
        raise BootstrapError(
            f"{source}: {field}: {reason}" if field else f"{source}: {reason}"
        ) from None
    # Deterministic so that equal configs give equal bytes (map fields are otherwise unordered).
    return message.SerializeToString(deterministic=True)
