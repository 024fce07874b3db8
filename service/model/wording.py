"""Why a value failed its point schema, in words a device operator can act on (the 1204 reasons).

jsonschema's own messages name schema keywords; these name the thing model's types and ranges.
"""

from __future__ import annotations

from typing import Any, Final, cast

from jsonschema import ValidationError
from jsonschema.protocols import Validator

from service.protocol.replies import json_type, quote, show

QUALITY_SHAPE: Final = 'expected {"value", "quality"} object (hasQuality)'


def explain(validator: Validator, has_quality: bool, value: object) -> str | None:
    """Why ``value`` fails ``validator``, in words for the device; None if jsonschema accepts it after all."""
    # The error nearest the root is the most telling: a wrong shape explains everything beneath it.
    errors = validator.iter_errors(cast(Any, value))
    error = min(errors, key=lambda found: len(found.absolute_path), default=None)
    if error is None:
        return None
    where = ""
    path = list(error.absolute_path)
    if has_quality and path:
        where, path = ("quality: ", []) if path[0] == "quality" else ("", path[1:])
    where += "".join(f"item [{part}]: " if isinstance(part, int) else f"member {quote(part)}: " for part in path)
    return where + _describe(error)


def _describe(error: ValidationError) -> str:
    schema = cast("dict[str, Any]", error.schema)  # ours, compiled above: always an object schema
    instance: Any = error.instance
    expected: Any = error.validator_value
    wrapper = schema.get("x-wrapper") == "quality"
    if error.validator == "type":
        wanted = QUALITY_SHAPE if wrapper else f"expected {schema['x-dataType']}"
        return f"{wanted}, got {json_type(instance)}"
    if error.validator in ("minimum", "maximum"):
        return f"value {show(instance)} out of {schema['x-dataType']} range ({schema['x-range']})"
    if error.validator == "maxItems":
        return f"array has {len(instance)} items, at most {expected}"
    if error.validator == "enum":
        values = [show(value) for value in expected]
        more = f", … ({len(values)} values in all)" if len(values) > 10 else ""
        return f"not one of {', '.join(values[:10])}{more}"
    if error.validator == "required":
        missing = quote(next(name for name in expected if name not in instance))
        return f"{QUALITY_SHAPE}, missing {missing}" if wrapper else f"missing required member {missing}"
    if error.validator == "additionalProperties":
        extra = quote(next(name for name in instance if name not in schema["properties"]))
        return f"{QUALITY_SHAPE}, unexpected key {extra}" if wrapper else f"unknown member {extra}"
    return error.message  # our own keywords already speak plainly
