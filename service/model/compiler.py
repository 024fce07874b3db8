"""Compile one thing-model measure point to a JSON Schema (Draft 2020-12 plus ``service.model.keywords``).

Model rules are checked here, at load: a malformed definition is a ``ModelError`` naming the point and
what is wrong with it. The compiled schema carries ``x-dataType``/``x-range`` notes for
``service.model.wording``, and ``service.model.fasttest`` derives the fast check from it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from jsonschema.exceptions import SchemaError

from service.errors import ModelError
from service.model.keywords import PointValidator, is_strict_int
from service.model.storable import DOUBLE_MAX, name_problem
from service.protocol.replies import quote

INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
FLOAT_MAX: Final = 3.4028234663852886e38
TIMESTAMP_MAX: Final = 253402300799999  # 9999-12-31 23:59:59.999 UTC
QUALITY_MAX: Final = 32767  # the quality column is a smallint
MAX_STRING_BYTES: Final = 1024
MAX_ARRAY_ITEMS: Final = 128
EVENT_TYPES: Final = ("INFO", "WARN", "ERROR")
DATA_TYPES: Final = ("ARRAY", "BOOL", "DATE", "DOUBLE", "ENUM", "FILE", "FLOAT", "INT", "STRING", "STRUCT", "TIMESTAMP")
ITEM_TYPES: Final = ("INT", "FLOAT", "DOUBLE", "STRING")
# Descriptive keys EnOS model exports carry; accepted and ignored. Anything else is refused, so a
# typo such as "hasQualty" cannot silently switch a rule off.
IGNORED_KEYS: Final = frozenset({"name", "desc", "description", "tags", "signalType", "unit", "$comment"})


def _text(data_type: str, **extra: Any) -> dict[str, Any]:
    return {"x-dataType": data_type, "type": "string", "noNul": True, "wellFormedUnicode": True, **extra}


def _number(data_type: str, limit: float, note: str) -> dict[str, Any]:
    return {
        "x-dataType": data_type,
        "type": "number",
        "finite": True,
        "minimum": -limit,
        "maximum": limit,
        "x-range": note,
    }


def _keys(where: str, mapping: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(mapping) - set(allowed) - IGNORED_KEYS)
    if unknown:
        raise ValueError(f"{where}: {unknown_keys(unknown, allowed)}")


def unknown_keys(unknown: Sequence[str], allowed: Sequence[str]) -> str:
    """Words for keys a model does not accept, listing every key it does (the descriptive ones included)."""
    names = ", ".join(quote(key) for key in unknown)
    everything = ", ".join([*allowed, *sorted(IGNORED_KEYS)])
    return f"unknown key{'s' if len(unknown) > 1 else ''} {names} (allowed: {everything})"


def _name(where: str, name: object, what: str = "identifier") -> str:
    if isinstance(name, str) and name_problem(name, what) is None:
        return name
    raise ValueError(f"{where}: {name_problem(name, what)}")


def _type_name(where: str, raw: object, allowed: Sequence[str], what: str = "dataType") -> str:
    # Type names are case-insensitive: EnOS's standard elements spell them in lower case.
    if isinstance(raw, str) and raw.upper() in allowed:
        return raw.upper()
    if raw is None:
        raise ValueError(f"{where}: {what} is missing (one of {', '.join(allowed)})")
    raise ValueError(f"{where}: unknown {what} {quote(raw)} (expected one of {', '.join(allowed)})")


def _enum(where: str, definition: Mapping[str, Any]) -> dict[str, Any]:
    kind = _type_name(where, definition.get("enumType"), ("INT", "STRING"), "enumType")
    desc = definition.get("enumDesc")
    if not isinstance(desc, dict) or not desc:
        raise ValueError(f"{where}: ENUM needs dataDefinition.enumDesc, a non-empty object of values")
    values: list[int | str] = []
    for key in desc:
        if kind == "STRING":
            values.append(_name(where, key, "enumDesc key"))
        elif not re.fullmatch("-?[0-9]+", key) or not INT32_MIN <= int(key) <= INT32_MAX:
            raise ValueError(f"{where}: enumDesc key {quote(key)} is not a decimal int32 (enumType INT)")
        elif int(key) in values:
            raise ValueError(f"{where}: enumDesc keys repeat the value {int(key)}")
        else:
            values.append(int(key))
    return {"x-dataType": f"ENUM ({kind})", "type": "integer" if kind == "INT" else "string", "enum": values}


def _struct(where: str, definition: Mapping[str, Any]) -> dict[str, Any]:
    items = definition.get("items")
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: STRUCT needs dataDefinition.items, a non-empty list of members")
    properties: dict[str, Any] = {}
    required: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: member [{index}] must be an object")
        _keys(f"{where}: member [{index}]", item, ("identifier", "dataType", "dataDefinition", "required"))
        name = _name(f"{where}: member [{index}]", item.get("identifier"))
        if name in properties:
            raise ValueError(f"{where}: member {quote(name)} is defined twice")
        if not isinstance(item.get("required", False), bool):
            raise ValueError(f"{where}: member {quote(name)}: required must be true or false")
        properties[name] = value_schema(f"{where}: member {quote(name)}", item, members=False)
        if item.get("required", False):
            required.append(name)
    return {
        "x-dataType": "STRUCT",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


_DEFINITION_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "ARRAY": ("itemType",),
    "BOOL": ("boolDesc",),
    "ENUM": ("enumType", "enumDesc"),
    "STRING": ("maxLength",),
    "STRUCT": ("items",),
}


def value_schema(where: str, point: Mapping[str, Any], *, members: bool = True) -> dict[str, Any]:
    """The schema of a bare value of ``point`` (``dataType`` + ``dataDefinition``); ValueError says what is wrong.

    ``members=False`` compiles a STRUCT member, which may not itself be a STRUCT.
    """
    allowed = DATA_TYPES if members else tuple(name for name in DATA_TYPES if name != "STRUCT")
    if not members and isinstance(point.get("dataType"), str) and point["dataType"].upper() == "STRUCT":
        raise ValueError(f"{where}: a STRUCT member cannot be a STRUCT")
    data_type = _type_name(where, point.get("dataType"), allowed)
    definition = point.get("dataDefinition")
    definition = {} if definition is None else definition
    if not isinstance(definition, dict):
        raise ValueError(f"{where}: dataDefinition must be an object")
    _keys(f"{where}: dataDefinition", definition, _DEFINITION_KEYS.get(data_type, ()))
    if data_type == "INT":
        return {"x-dataType": "INT", "type": "integer", "minimum": INT32_MIN, "maximum": INT32_MAX, "x-range": "int32"}
    if data_type == "FLOAT":
        return _number("FLOAT", FLOAT_MAX, "single precision")
    if data_type == "DOUBLE":
        return _number("DOUBLE", DOUBLE_MAX, "double precision")
    if data_type == "BOOL":
        return {"x-dataType": "BOOL", "type": "boolean"}
    if data_type == "ENUM":
        return _enum(where, definition)
    if data_type == "STRING":
        limit = definition.get("maxLength", MAX_STRING_BYTES)
        if not is_strict_int(None, limit) or not 1 <= limit <= MAX_STRING_BYTES:
            raise ValueError(f"{where}: maxLength must be an integer from 1 to {MAX_STRING_BYTES} (bytes)")
        return _text("STRING", maxBytes=limit)
    if data_type == "TIMESTAMP":
        return {
            "x-dataType": "TIMESTAMP",
            "type": "integer",
            "minimum": 0,
            "maximum": TIMESTAMP_MAX,
            "x-range": f"0..{TIMESTAMP_MAX} ms since epoch",
        }
    if data_type == "DATE":
        return _text("DATE", calendarDate=True)
    if data_type == "FILE":
        return _text("FILE", maxBytes=MAX_STRING_BYTES)
    if data_type == "ARRAY":
        item_type = _type_name(where, definition.get("itemType"), ITEM_TYPES, "itemType")
        items = value_schema(f"{where}: itemType", {"dataType": item_type})
        return {"x-dataType": "ARRAY", "type": "array", "maxItems": MAX_ARRAY_ITEMS, "items": items}
    return _struct(where, definition)


def point_schema(value: dict[str, Any], has_quality: bool) -> dict[str, Any]:
    """The whole schema of a point: the bare value, or the ``{"value", "quality"}`` wrapper around it."""
    if has_quality:
        quality = {
            "x-dataType": "INT",
            "type": "integer",
            "minimum": 0,
            "maximum": QUALITY_MAX,
            "x-range": f"0..{QUALITY_MAX}",
        }
        value = {
            "x-wrapper": "quality",
            "type": "object",
            "properties": {"value": value, "quality": quality},
            "required": ["value", "quality"],
            "additionalProperties": False,
        }
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **value}
    PointValidator.check_schema(schema)
    return schema


def compile_point(path: str, identifier: str, point: object) -> tuple[str, bool, dict[str, Any]]:
    """``(DATA TYPE, has_quality, schema)`` for one measure point; raises ModelError naming the point."""
    where = f"measurepoint {quote(identifier)}"
    try:
        _name(where, identifier)
        if not isinstance(point, dict):
            raise ValueError(f"{where}: must be an object with a dataType")
        _keys(where, point, ("identifier", "dataType", "dataDefinition", "hasQuality"))
        if point.get("identifier", identifier) != identifier:
            raise ValueError(f"{where}: identifier {quote(point['identifier'])} differs from its key")
        has_quality = point.get("hasQuality", False)
        if not isinstance(has_quality, bool):
            raise ValueError(f"{where}: hasQuality must be true or false")
        schema = point_schema(value_schema(where, point), has_quality)
        return point["dataType"].upper(), has_quality, schema
    except ValueError as exc:
        raise ModelError(path, str(exc)) from None
    except SchemaError as exc:  # a rule above let through what the metaschema refuses: our bug, still refused
        raise ModelError(path, f"{where}: compiles to an invalid JSON Schema: {exc.message}") from None


def compile_event(path: str, identifier: str, event: object) -> tuple[str, list[tuple[str, str, bool, dict[str, Any]]]]:
    """``(EVENT TYPE, [(parameter, DATA TYPE, required, schema), ...])`` for one event; ModelError names the event.

    An event is EnOS's shape: ``{"eventType": "INFO"|"WARN"|"ERROR", "outputData": [{"identifier", "dataType",
    "dataDefinition", "required"}, ...]}``. Each output parameter compiles exactly as a measure point without
    quality does (`value_schema`), so it is checked with the same types, ranges and wording.
    """
    where = f"event {quote(identifier)}"
    try:
        _name(where, identifier)
        if not isinstance(event, dict):
            raise ValueError(f"{where}: must be an object with an eventType and outputData")
        _keys(where, event, ("identifier", "eventType", "outputData"))
        if event.get("identifier", identifier) != identifier:
            raise ValueError(f"{where}: identifier {quote(event['identifier'])} differs from its key")
        event_type = _type_name(where, event.get("eventType"), EVENT_TYPES, "eventType")
        output = event.get("outputData", [])
        if not isinstance(output, list):
            raise ValueError(f"{where}: outputData must be a list of parameters")
        params: list[tuple[str, str, bool, dict[str, Any]]] = []
        for index, param in enumerate(output):
            at = f"{where}: outputData [{index}]"
            if not isinstance(param, dict):
                raise ValueError(f"{at} must be an object")
            _keys(at, param, ("identifier", "dataType", "dataDefinition", "required"))
            name = _name(at, param.get("identifier"))
            if any(name == seen for seen, *_ in params):
                raise ValueError(f"{where}: output parameter {quote(name)} is defined twice")
            required = param.get("required", False)
            if not isinstance(required, bool):
                raise ValueError(f"{where}: output parameter {quote(name)}: required must be true or false")
            schema = point_schema(value_schema(f"{where}: output parameter {quote(name)}", param), False)
            params.append((name, param["dataType"].upper(), required, schema))
        return event_type, params
    except ValueError as exc:
        raise ModelError(path, str(exc)) from None
    except SchemaError as exc:  # as for measure points: our bug, still refused
        raise ModelError(path, f"{where}: compiles to an invalid JSON Schema: {exc.message}") from None
