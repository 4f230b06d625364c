"""Turns a protobuf JSON parse failure into the path of the offending field and a plain reason."""

import difflib
import json
import re
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from meshctl.agent import xds_types

_INTEGER_TYPES = {
    FieldDescriptor.CPPTYPE_INT32: "int32",
    FieldDescriptor.CPPTYPE_INT64: "int64",
    FieldDescriptor.CPPTYPE_UINT32: "uint32",
    FieldDescriptor.CPPTYPE_UINT64: "uint64",
}
_WRAPPER_TYPES = {
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}
# json_format appends where it was (` at "Bootstrap.x[0]"`, sometimes a list of fields); the
# path computed here replaces it, so that tail is cut from its messages.
_WHERE_SUFFIX = re.compile(r'\.*\s+at "?[A-Za-z_]\w*([.\[]|"|\.*$).*', re.DOTALL)


def locate(descriptor: Descriptor, document: Any, error: json_format.ParseError) -> tuple[str, str]:
    """The dotted path (as the user wrote the keys) of the field in `document` that does not parse
    as `descriptor`, and why. `error` is what json_format.ParseDict raised for the whole document.
    """
    return _locate(descriptor, document, "", error)


def describe_value(value: Any) -> str:
    """A short description of a parsed YAML/JSON value for error messages."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    try:
        return json.dumps(value)
    except TypeError:  # YAML also yields dates and such, which JSON has no word for
        return repr(value)


def _locate(descriptor: Descriptor, document: Any, path: str, error: Exception) -> tuple[str, str]:
    # json_format's own messages lose list indices and oneof member names along the way, so the
    # failing field is found again by parsing ever smaller pieces of the document.
    if descriptor.full_name == "google.protobuf.Any" and isinstance(document, dict):
        return _locate_any(document, path, error)
    if descriptor.full_name in _WRAPPER_TYPES:
        return path, _scalar_reason(descriptor.fields_by_name["value"], document, error)
    if descriptor.full_name.startswith("google.protobuf."):
        # Other well-known types (Duration, Timestamp, Struct) have their own JSON forms: leaves.
        return path, _innermost(error)
    if not isinstance(document, dict):
        return (
            path,
            f"expected a mapping of {descriptor.name} fields, got {describe_value(document)}",
        )
    for key, value in document.items():
        field = _field(descriptor, key)
        if field is None:
            return _join(path, key), _unknown_field(descriptor, key)
        key_error = _parse_error(descriptor, {key: value})
        if key_error is not None:
            return _locate_field(field, key, value, _join(path, key), key_error, descriptor)
    return path, _oneof_conflict(descriptor, document) or _innermost(error)


def _locate_field(
    field: FieldDescriptor,
    key: str,
    value: Any,
    path: str,
    error: Exception,
    parent: Descriptor,
) -> tuple[str, str]:
    if _is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        if isinstance(value, dict) and value_field.message_type is not None:
            for map_key, item in value.items():
                item_error = _parse_error(parent, {key: {map_key: item}})
                if item_error is not None:
                    return _locate(
                        value_field.message_type, item, f'{path}["{map_key}"]', item_error
                    )
        if not isinstance(value, dict):
            return path, f"expected a mapping, got {describe_value(value)}"
        return path, _innermost(error)
    if field.is_repeated and isinstance(value, list):
        for index, item in enumerate(value):
            item_error = _parse_error(parent, {key: [item]})
            if item_error is not None:
                return _locate_scalar_or_message(field, item, f"{path}[{index}]", item_error)
        return path, _innermost(error)
    if field.is_repeated:
        return path, f"expected a list, got {describe_value(value)}"
    return _locate_scalar_or_message(field, value, path, error)


def _locate_scalar_or_message(
    field: FieldDescriptor, value: Any, path: str, error: Exception
) -> tuple[str, str]:
    if field.message_type is not None:
        return _locate(field.message_type, value, path, error)
    return path, _scalar_reason(field, value, error)


def _locate_any(document: dict[str, Any], path: str, error: Exception) -> tuple[str, str]:
    type_url = document.get("@type")
    if not type_url:
        return path, 'missing "@type" (the type URL of the message it holds)'
    descriptor = xds_types.find_message_type(str(type_url))
    if descriptor is None:
        return _join(path, "@type"), f'unknown type "{type_url}"'
    body = {key: value for key, value in document.items() if key != "@type"}
    body_error = _parse_error(descriptor, body)
    if body_error is None:
        return path, _innermost(error)
    return _locate(descriptor, body, path, body_error)


def _parse_error(descriptor: Descriptor, document: Any) -> json_format.ParseError | None:
    try:
        json_format.ParseDict(document, xds_types.message_class(descriptor)())
    except json_format.ParseError as error:
        return error
    return None


def _field(descriptor: Descriptor, key: Any) -> FieldDescriptor | None:
    if not isinstance(key, str):
        return None
    field = descriptor.fields_by_name.get(key)
    if field is None:
        field = next((f for f in descriptor.fields if f.json_name == key), None)
    return field


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _unknown_field(descriptor: Descriptor, key: Any) -> str:
    names = [field.name for field in descriptor.fields]
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f'unknown field "{key}" in {descriptor.full_name}{hint}'


def _scalar_reason(field: FieldDescriptor, value: Any, error: Exception) -> str:
    if field.enum_type is not None:
        names = ", ".join(v.name for v in field.enum_type.values)
        return f"{describe_value(value)} is not a {field.enum_type.name}; expected one of {names}"
    if field.cpp_type in _INTEGER_TYPES:
        if not _looks_like_integer(value):
            return f"expected an integer, got {describe_value(value)}"
        return f"{describe_value(value)} is out of range for {_INTEGER_TYPES[field.cpp_type]}"
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL and not isinstance(value, bool):
        return f"expected true or false, got {describe_value(value)}"
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING and not isinstance(value, str):
        return f"expected a string, got {describe_value(value)}"
    return _innermost(error)


def _looks_like_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()) is not None


def _oneof_conflict(descriptor: Descriptor, document: dict[Any, Any]) -> str | None:
    for oneof in descriptor.oneofs:
        members = {field.name for field in oneof.fields} | {
            field.json_name for field in oneof.fields
        }
        present = [key for key in document if key in members and document[key] is not None]
        if len(present) > 1:
            listed = ", ".join(f'"{key}"' for key in present)
            return f"set only one of {listed} (they are alternatives: oneof {oneof.name})"
    return None


def _innermost(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error)
    if isinstance(error, json_format.ParseError):
        text = _WHERE_SUFFIX.sub("", text)
    return text.rstrip(".") or type(error).__name__


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)
