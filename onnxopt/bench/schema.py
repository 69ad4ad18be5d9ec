"""Check a bench report against ``schema.json`` without the ``jsonschema`` package.

The validator implements the subset of JSON Schema the bench schema uses: ``type``
(one or a list, ``integer`` excludes booleans, a float with an integral value is not
an integer), ``required``, ``properties``, ``additionalProperties`` (false or a
schema), ``items``, ``minItems``/``maxItems``, ``enum``, ``minimum``,
``exclusiveMinimum``, ``exclusiveMaximum``. Unknown keywords are an error, so the
schema cannot silently grow past what is checked here.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from onnxopt.errors import OnnxoptError

_ANNOTATIONS = {"$schema", "$id", "title", "description"}
_KEYWORDS = {
    "type", "required", "properties", "additionalProperties", "items", "minItems", "maxItems", "enum",
    "minimum", "exclusiveMinimum", "exclusiveMaximum",
} | _ANNOTATIONS


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    return json.loads(resources.files("onnxopt.bench").joinpath("schema.json").read_text(encoding="utf-8"))


def _is_type(value, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise ValueError(f"unknown JSON Schema type {name!r}")


def validate(instance, schema: dict, path: str = "$") -> list[str]:
    """All violations as ``"$.results[0].runs: ..."`` strings (empty: valid)."""
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"{path}: schema keyword(s) not supported by this validator: {sorted(unknown)}")
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(instance, t) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(instance).__name__} {instance!r:.60}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']}")
    if _is_type(instance, "number"):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance} is below the minimum {schema['minimum']}")
        if "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {instance} must be greater than {schema['exclusiveMinimum']}")
        if "exclusiveMaximum" in schema and instance >= schema["exclusiveMaximum"]:
            errors.append(f"{path}: {instance} must be less than {schema['exclusiveMaximum']}")
    if isinstance(instance, dict):
        for key in schema.get("required", ()):
            if key not in instance:
                errors.append(f"{path}: missing required property {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                errors.extend(validate(value, props[key], f"{path}.{key}"))
            elif extra is False:
                errors.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                errors.extend(validate(value, extra, f"{path}.{key}"))
    if isinstance(instance, list):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            errors.append(f"{path}: {len(instance)} items, at least {schema['minItems']} required")
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            errors.append(f"{path}: {len(instance)} items, at most {schema['maxItems']} allowed")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors.extend(validate(item, schema["items"], f"{path}[{i}]"))
    return errors


def validate_report(data: dict) -> None:
    """Raise OnnxoptError naming the first violation if ``data`` does not match the schema."""
    errors = validate(data, load_schema())
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise OnnxoptError(f"bench report does not match schema.json: {errors[0]}{more}")
