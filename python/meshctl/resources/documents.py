"""Multi-document YAML (or JSON) into plain documents, with line numbers and bounded expansion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from meshctl.resources.errors import Issue, ValidationFailed


@dataclass(frozen=True)
class Document:
    index: int  # 1-based, as a person counts the documents in a file
    line: int  # 1-based line where the document starts
    data: Any

    @property
    def where(self) -> str:
        return f"document {self.index} (line {self.line})"


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases: nested aliases expand exponentially (a "YAML bomb")
    once the documents are walked, and mesh resources have no use for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                None, None, "YAML aliases (*name) are not supported", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        # A key is a field or header name, never a boolean: YAML 1.1 would read Fallback's `on:`
        # (or a label key `yes`) as True. Keys keep their text, as YAML 1.2 parsers do.
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _BOOL_TAG and not key_node.style:
                key_node.tag = _STR_TAG
        return super().construct_mapping(node, deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_STR_TAG = "tag:yaml.org,2002:str"


def parse_documents(text: str, max_documents: int = 5000) -> list[Document]:
    """Every non-empty document in `text`. Malformed YAML refuses the whole text."""
    loader = _NoAliasLoader(text)
    documents: list[Document] = []
    index = 0
    try:
        while loader.check_node():
            index += 1
            node = loader.get_node()
            line = node.start_mark.line + 1 if node is not None else 0
            data = loader.construct_document(node)
            if data is None:  # `---` with nothing after it, or a comment-only document
                continue
            if len(documents) >= max_documents:
                raise ValidationFailed(
                    [
                        Issue(
                            f"document {index}",
                            "",
                            f"more than {max_documents} documents in one apply",
                        )
                    ]
                )
            documents.append(Document(index, line, data))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"document {index or 1}"
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = error.problem or error.context or "malformed"
        raise ValidationFailed([Issue(where, "", f"malformed YAML{position}: {problem}")]) from None
    except yaml.YAMLError as error:
        raise ValidationFailed(
            [Issue(f"document {index or 1}", "", f"malformed YAML: {error}")]
        ) from None
    except RecursionError:
        raise ValidationFailed(
            [Issue(f"document {index or 1}", "", "malformed YAML: nested too deeply")]
        ) from None
    finally:
        loader.dispose()
    return documents
