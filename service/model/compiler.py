"""Compile one thing-model measure point to a JSON Schema, and say in words why a value failed it.

JSON Schema cannot express a few of our rules, so the validator class adds keywords for them:
``noNul`` and ``wellFormedUnicode`` (PostgreSQL refuses U+0000 and lone surrogates, which
``json.loads`` lets through), ``maxBytes`` (STRING limits count UTF-8 bytes, not characters),
``finite`` and ``calendarDate`` (DATE). ``integer`` is redefined so that ``1.0`` is not an INT.
Values of points a model does not define get no schema, only ``tree_problem``'s storability walk.

jsonschema costs tens of microseconds a point, so ``fast_test`` derives a plain-Python test from
each compiled schema for the common case, a valid point; ``explain`` asks jsonschema why a value
failed, in words a device operator can act on.
"""

from __future__ import annotations

import datetime
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, cast

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator

from service.errors import ModelError
from service.protocol.replies import json_type, quote, show

INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
FLOAT_MAX: Final = 3.4028234663852886e38
DOUBLE_MAX: Final = sys.float_info.max
TIMESTAMP_MAX: Final = 253402300799999  # 9999-12-31 23:59:59.999 UTC
QUALITY_MAX: Final = 32767  # the quality column is a smallint
MAX_STRING_BYTES: Final = 1024
MAX_ARRAY_ITEMS: Final = 128
MAX_NESTING: Final = 64  # arrays/objects inside a point value outside the model (orjson stops at 255)
DATA_TYPES: Final = ("ARRAY", "BOOL", "DATE", "DOUBLE", "ENUM", "FILE", "FLOAT", "INT", "STRING", "STRUCT", "TIMESTAMP")
ITEM_TYPES: Final = ("INT", "FLOAT", "DOUBLE", "STRING")
# Descriptive keys EnOS model exports carry; accepted and ignored. Anything else is refused, so a
# typo such as "hasQualty" cannot silently switch a rule off.
IGNORED_KEYS: Final = frozenset({"name", "desc", "description", "tags", "signalType", "unit", "$comment"})
QUALITY_SHAPE: Final = 'expected {"value", "quality"} object (hasQuality)'

_SURROGATE = re.compile("[\ud800-\udfff]")
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?: ([0-9]{2}):([0-9]{2}):([0-9]{2}))?")


def nul_problem(text: str) -> str | None:
    """``"string contains U+0000 (NUL)"`` when ``text`` has one, else None."""
    return "string contains U+0000 (NUL)" if "\x00" in text else None


def surrogate_problem(text: str) -> str | None:
    """Names the first lone surrogate in ``text`` (PostgreSQL cannot store it), else None."""
    if text.isascii() or (found := _SURROGATE.search(text)) is None:
        return None
    return f"string contains a lone surrogate U+{ord(found.group()):04X}"


def text_problem(text: str) -> str | None:
    """Why PostgreSQL would refuse ``text`` (a NUL or a lone surrogate), or None."""
    return nul_problem(text) or surrogate_problem(text)


def _no_nul(_v: Any, enabled: Any, instance: Any, _s: Any) -> Iterator[ValidationError]:
    if enabled and isinstance(instance, str) and (problem := nul_problem(instance)):
        yield ValidationError(problem)


def _well_formed(_v: Any, enabled: Any, instance: Any, _s: Any) -> Iterator[ValidationError]:
    if enabled and isinstance(instance, str) and (problem := surrogate_problem(instance)):
        yield ValidationError(problem)


def _max_bytes(_v: Any, limit: Any, instance: Any, _s: Any) -> Iterator[ValidationError]:
    # Each character is at most 4 bytes, so short strings need no encoding at all.
    if isinstance(instance, str) and len(instance) * 4 > limit:
        size = len(instance) if instance.isascii() else len(instance.encode("utf-8", "surrogatepass"))
        if size > limit:
            yield ValidationError(f"string is {size} bytes, at most {limit}")


def _finite(_v: Any, enabled: Any, instance: Any, _s: Any) -> Iterator[ValidationError]:
    if enabled and isinstance(instance, float) and not math.isfinite(instance):
        yield ValidationError(f"value {instance} is not a finite number")


def is_date(text: str) -> bool:
    """True for ``YYYY-MM-DD`` or ``YYYY-MM-DD HH:MM:SS`` naming a real calendar date and time."""
    match = _DATE.fullmatch(text)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(part) for part in match.groups("0"))
    try:
        datetime.date(year, month, day)
        datetime.time(hour, minute, second)
    except ValueError:
        return False
    return True


def _calendar_date(_v: Any, enabled: Any, instance: Any, _s: Any) -> Iterator[ValidationError]:
    if enabled and isinstance(instance, str) and not is_date(instance):
        yield ValidationError(
            f'{quote(instance[:40])} is not a DATE ("YYYY-MM-DD" or "YYYY-MM-DD HH:MM:SS", a real calendar date)'
        )


def tree_problem(value: object) -> str | None:
    """Why a JSON value of a point outside the model cannot be stored (bad text, number beyond double, nested
    deeper than `MAX_NESTING`), or None."""
    # Iterative, and the path to each node is a parent-linked trail spelt out only on failure: a value
    # can nest deeper than the Python stack, and building every path string would cost quadratic time.
    stack: list[tuple[object, tuple[Any, ...], int]] = [(value, (), 0)]
    while stack:
        item, trail, depth = stack.pop()
        problem = None
        if isinstance(item, str):
            problem = text_problem(item)
        elif isinstance(item, float | int) and not isinstance(item, bool):
            # Also false for NaN; and math.isfinite would overflow on a huge int.
            if not -DOUBLE_MAX <= item <= DOUBLE_MAX:
                problem = f"number {show(item)} does not fit a double"
        elif isinstance(item, list | dict) and depth >= MAX_NESTING:
            # the JSON encoder that stores values refuses deep nesting: refuse it here (where is beside the point)
            return f"value nested deeper than {MAX_NESTING} levels"
        elif isinstance(item, list):
            stack.extend((item[index], (trail, index), depth + 1) for index in range(len(item) - 1, -1, -1))
        elif isinstance(item, dict):
            for key, member in item.items():
                if (problem := text_problem(key)) is not None:
                    problem = f"key {problem.removeprefix('string ')}"
                    break
                stack.append((member, (trail, key), depth + 1))
        if problem is not None:
            return _spell(trail) + problem
    return None


def _spell(trail: tuple[Any, ...]) -> str:
    parts: list[str] = []
    while trail:
        trail, step = trail
        parts.append(f"item [{step}]: " if isinstance(step, int) else f"member {quote(step)}: ")
    return "".join(reversed(parts))


def _is_strict_int(_checker: object, instance: object) -> bool:
    # Draft 2020-12 calls 1.0 an integer; a device that sends 1.0 for an INT sent a float.
    return isinstance(instance, int) and not isinstance(instance, bool)


_extend: Callable[..., type[Validator]] = validators.extend
PointValidator: Final = _extend(
    Draft202012Validator,
    {
        "noNul": _no_nul,
        "wellFormedUnicode": _well_formed,
        "maxBytes": _max_bytes,
        "finite": _finite,
        "calendarDate": _calendar_date,
    },
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_int),
)
"""Draft 2020-12 plus our keywords; every point schema is checked with this class."""


_Test = Callable[[Any], bool]


def _all(tests: Sequence[_Test]) -> _Test:
    def passes(value: Any) -> bool:
        for test in tests:  # noqa: SIM110 - a plain loop is faster than all() over a generator here
            if not test(value):
                return False
        return True

    return tests[0] if len(tests) == 1 else passes


def _each(test: _Test) -> _Test:
    return lambda values: all(map(test, values))


def _members(tests: Mapping[str, _Test]) -> _Test:
    return lambda value: all(test(value[name]) for name, test in tests.items() if name in value)


_EXACT_TYPES: Final[Mapping[str, _Test]] = {
    "integer": lambda value: type(value) is int,
    "number": lambda value: type(value) is float or type(value) is int,
    "string": lambda value: type(value) is str,
    "boolean": lambda value: value is True or value is False,
    "array": lambda value: type(value) is list,
    "object": lambda value: type(value) is dict,
}
# Each builder may assume the value already has the schema's "type": that test always runs first.
_KEYWORD_TESTS: Final[Mapping[str, Callable[[Any], _Test]]] = {
    "minimum": lambda low: lambda value: value >= low,
    "maximum": lambda high: lambda value: value <= high,
    "finite": lambda _: lambda value: type(value) is int or math.isfinite(value),
    "enum": lambda values: frozenset(values).__contains__,
    "maxItems": lambda most: lambda value: len(value) <= most,
    "items": lambda schema: _each(fast_test(schema)),
    "properties": lambda schemas: _members({name: fast_test(sub) for name, sub in schemas.items()}),
    "required": lambda names: lambda value: all(name in value for name in names),
    "noNul": lambda _: lambda value: "\x00" not in value,
    "wellFormedUnicode": lambda _: lambda value: surrogate_problem(value) is None,
    "maxBytes": lambda most: (
        lambda value: len(value) * 4 <= most or len(value.encode("utf-8", "surrogatepass")) <= most
    ),
    "calendarDate": lambda _: is_date,
}


def fast_test(schema: Mapping[str, Any]) -> _Test:
    """A plain-Python ``is_valid`` for the schemas this module compiles, several times faster than jsonschema.

    It may refuse more than jsonschema (it wants the exact types a JSON parser makes), never less:
    callers ask ``PointValidator`` before refusing anything. A keyword it does not know is a
    ValueError, so it can never silently skip a rule.
    """
    if "type" not in schema:
        raise ValueError("fast_test needs a schema with a type")
    tests = [_EXACT_TYPES[schema["type"]]]
    for keyword, argument in schema.items():
        if keyword in ("type", "$schema") or keyword.startswith("x-"):
            continue
        if keyword == "additionalProperties" and argument is False:
            tests.append(frozenset(schema.get("properties", ())).issuperset)
            continue
        if keyword not in _KEYWORD_TESTS:
            raise ValueError(f"fast_test cannot apply {keyword!r}: {argument!r}")
        tests.append(_KEYWORD_TESTS[keyword](argument))
    return _all(tests)


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
        raise ValueError(f"{where}: unknown key {quote(unknown[0])} (allowed: {', '.join(allowed)})")


def name_problem(name: object, what: str = "identifier") -> str | None:
    """Why ``name`` cannot name a point, member or enum value (not a non-empty, storable string), or None."""
    if not isinstance(name, str) or not name:
        return f"{what} must be a non-empty string"
    problem = text_problem(name)
    return f"{what} {problem.removeprefix('string ')}" if problem else None


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
        if not _is_strict_int(None, limit) or not 1 <= limit <= MAX_STRING_BYTES:
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
