"""service.model.fasttest: the plain-Python check derived from a compiled schema, never laxer than jsonschema."""

from __future__ import annotations

import pytest

from service.model.compiler import value_schema
from service.model.fasttest import fast_test


def test_exact_types() -> None:
    """The fast test wants the exact types a JSON parser makes: no bool for a number, no 1.0 for an integer."""
    number = fast_test({"type": "number"})
    assert number(1) and number(1.5) and not number(True)
    integer = fast_test({"type": "integer"})
    assert integer(1) and not integer(1.0) and not integer(False)


def test_compiled_int_schema_checks_the_range() -> None:
    """An INT point's fast test applies int32 bounds."""
    test = fast_test(value_schema("p", {"dataType": "INT"}))
    assert test(2**31 - 1) and not test(2**31)


def test_struct_members_and_unknown_members() -> None:
    """A STRUCT's members are tested by their own schemas; unknown and missing required members fail."""
    schema = value_schema(
        "p",
        {
            "dataType": "STRUCT",
            "dataDefinition": {"items": [{"identifier": "a", "dataType": "INT", "required": True}]},
        },
    )
    test = fast_test(schema)
    assert test({"a": 1})
    assert not test({"a": "1"})
    assert not test({})
    assert not test({"a": 1, "b": 2})


def test_string_keywords() -> None:
    """STRING's byte limit, NUL and surrogate rules are all applied by the fast test."""
    test = fast_test(value_schema("p", {"dataType": "STRING", "dataDefinition": {"maxLength": 4}}))
    assert test("abcd") and not test("abcde") and not test("éé é") and not test("a\x00") and not test("\ud800")


def test_schema_without_type_or_with_unknown_keyword_is_refused() -> None:
    """The fast test refuses to be built rather than silently skip a rule it cannot apply."""
    with pytest.raises(ValueError, match="needs a schema with a type"):
        fast_test({"minimum": 1})
    with pytest.raises(ValueError, match="'pattern'"):
        fast_test({"type": "string", "pattern": "^a"})
