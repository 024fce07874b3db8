"""``fast_test``: a plain-Python ``is_valid`` derived from each compiled point schema.

jsonschema costs tens of microseconds a point; a good point, the common case, needs only this test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from service.model.keywords import is_date
from service.model.storable import surrogate_problem

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
