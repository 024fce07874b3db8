"""service.model.wording: why a value failed its point schema, in the thing model's words."""

from __future__ import annotations

from typing import Any

import pytest

from service.model.compiler import point_schema, value_schema
from service.model.keywords import PointValidator
from service.model.wording import QUALITY_SHAPE, explain


def reason(point: dict[str, Any], value: object) -> str | None:
    has_quality = bool(point.pop("hasQuality", False))
    validator = PointValidator(point_schema(value_schema("p", point), has_quality))
    return explain(validator, has_quality, value)


@pytest.mark.parametrize(
    ("point", "value", "words"),
    [
        ({"dataType": "INT"}, 1.0, "expected INT, got number 1.0"),
        ({"dataType": "INT"}, 2**31, "value 2147483648 out of INT range (int32)"),
        ({"dataType": "BOOL"}, 5, "expected BOOL, got integer 5"),
        ({"dataType": "ARRAY", "dataDefinition": {"itemType": "INT"}}, [1, "2"], "item [1]: expected INT, got string"),
        ({"dataType": "ARRAY", "dataDefinition": {"itemType": "INT"}}, [0] * 129, "array has 129 items, at most 128"),
        ({"dataType": "INT", "hasQuality": True}, 1, f"{QUALITY_SHAPE}, got integer 1"),
        ({"dataType": "INT", "hasQuality": True}, {"value": 1}, f'{QUALITY_SHAPE}, missing "quality"'),
        (
            {"dataType": "INT", "hasQuality": True},
            {"value": 1, "quality": True},
            "quality: expected INT, got boolean true",
        ),
        ({"dataType": "STRING", "dataDefinition": {"maxLength": 2}}, "abc", "string is 3 bytes, at most 2"),
    ],
)
def test_reasons_use_model_types_and_paths(point: dict[str, Any], value: object, words: str) -> None:
    """The reason names the dataType, the offending value's JSON type and where inside the value it is."""
    assert reason(point, value) == words


def test_struct_reasons_name_members() -> None:
    """Missing, unknown and wrong members of a STRUCT are named as members."""
    struct = {
        "dataType": "STRUCT",
        "dataDefinition": {"items": [{"identifier": "a", "dataType": "INT", "required": True}]},
    }
    assert reason(dict(struct), {}) == 'missing required member "a"'
    assert reason(dict(struct), {"a": 1, "b": 2}) == 'unknown member "b"'
    assert reason(dict(struct), {"a": "x"}) == 'member "a": expected INT, got string'


def test_long_enums_are_cut_after_ten_values() -> None:
    """An ENUM with many values lists ten, then ``…`` and the total."""
    desc: dict[str, Any] = {str(number): {} for number in range(25)}
    words = reason({"dataType": "ENUM", "dataDefinition": {"enumType": "INT", "enumDesc": desc}}, 99)
    assert words == "not one of 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, … (25 values in all)"


def test_valid_value_has_no_reason() -> None:
    """explain returns None when jsonschema accepts the value after all."""
    assert reason({"dataType": "FLOAT"}, 1) is None
