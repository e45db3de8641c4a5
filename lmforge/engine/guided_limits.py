"""Bounds on what a response_format schema may ask of the grammar compiler (lmforge.engine.guided).

xgrammar's compile time grows faster than linearly in enum sizes and in optional properties (a 100k-entry enum
took 129 s of CPU, a 5,000-property object minutes), so a schema is measured before it is compiled and refused
with a ValueError naming the limit it breaks. The numbers leave room for any hand-written schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SchemaLimits:
    max_bytes: int = 64 * 1024  # the schema as compact JSON
    max_depth: int = 64  # levels of the schema document (an object in an object takes two: properties, name)
    max_nodes: int = 4096  # dicts, lists and scalars in the schema document
    max_enum: int = 1024  # entries of one enum (or oneOf/anyOf alternatives)
    max_properties: int = 256  # properties of one object
    compile_timeout: float = 10.0  # seconds the server waits for a compile (the caller enforces it)


DEFAULT_SCHEMA_LIMITS = SchemaLimits()


def check_schema(schema: Any, limits: SchemaLimits = DEFAULT_SCHEMA_LIMITS) -> None:
    """Raise ValueError when `schema` (a parsed JSON schema) exceeds one of `limits`.

    The walk is iterative and runs before anything recursive (json.dumps, the compiler) sees the schema.
    """
    num_nodes = 0
    stack: list[tuple[Any, int, str]] = [(schema, 1, "schema")]
    while stack:
        node, depth, path = stack.pop()
        num_nodes += 1
        if num_nodes > limits.max_nodes:
            raise ValueError(f"response_format schema has more than {limits.max_nodes} nodes")
        if depth > limits.max_depth:
            raise ValueError(f"response_format schema nests deeper than {limits.max_depth} levels (at {path})")
        if isinstance(node, dict):
            for key in ("enum", "oneOf", "anyOf"):
                items = node.get(key)
                if isinstance(items, list) and len(items) > limits.max_enum:
                    raise ValueError(
                        f"response_format schema: {path}.{key} has {len(items)} entries; "
                        f"at most {limits.max_enum} are allowed"
                    )
            props = node.get("properties")
            if isinstance(props, dict) and len(props) > limits.max_properties:
                raise ValueError(
                    f"response_format schema: {path}.properties has {len(props)} entries; "
                    f"at most {limits.max_properties} are allowed"
                )
            stack.extend((v, depth + 1, f"{path}.{k}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, depth + 1, f"{path}[{i}]") for i, v in enumerate(node))
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > limits.max_bytes:
        raise ValueError(f"response_format schema is {size} bytes; at most {limits.max_bytes} are allowed")
