"""service.model.compiler: thing-model measure points to JSON Schemas, and malformed definitions refused."""

from __future__ import annotations

from typing import Any

import pytest

from service.errors import ModelError
from service.model.compiler import DATA_TYPES, INT32_MAX, compile_point, point_schema, value_schema
from service.model.keywords import PointValidator


@pytest.mark.parametrize("data_type", DATA_TYPES)
def test_every_data_type_compiles_to_a_valid_draft_2020_12_schema(data_type: str) -> None:
    """Each EnOS dataType compiles (with the definition it needs) to a schema the metaschema accepts."""
    definitions: dict[str, Any] = {
        "ENUM": {"enumType": "INT", "enumDesc": {"0": {}}},
        "ARRAY": {"itemType": "INT"},
        "STRUCT": {"items": [{"identifier": "a", "dataType": "INT"}]},
    }
    point = {"dataType": data_type, "dataDefinition": definitions.get(data_type)}
    name, has_quality, schema = compile_point("m.json", "p", point)
    assert (name, has_quality) == (data_type, False)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    PointValidator.check_schema(schema)


def test_int_is_an_int32_with_a_range_note() -> None:
    """INT compiles to a strict integer within int32, with the note the reason wording uses."""
    schema = value_schema("p", {"dataType": "int"})  # type names are case-insensitive
    assert schema["type"] == "integer" and schema["maximum"] == INT32_MAX and schema["x-range"] == "int32"


def test_quality_wraps_the_value() -> None:
    """hasQuality wraps the value schema in a closed {"value", "quality"} object."""
    schema = point_schema(value_schema("p", {"dataType": "BOOL"}), True)
    assert schema["required"] == ["value", "quality"] and schema["additionalProperties"] is False
    assert schema["properties"]["value"]["type"] == "boolean"


@pytest.mark.parametrize(
    ("point", "reason"),
    [
        ({"dataType": "NOPE"}, 'unknown dataType "NOPE"'),
        ({}, "dataType is missing"),
        ({"dataType": "INT", "hasQualty": True}, 'unknown key "hasQualty"'),
        ({"dataType": "INT", "hasQuality": "yes"}, "hasQuality must be true or false"),
        ({"dataType": "STRING", "dataDefinition": {"maxLength": 2000}}, "maxLength must be an integer from 1"),
        ({"dataType": "ENUM", "dataDefinition": {"enumType": "INT", "enumDesc": {"x": {}}}}, "not a decimal int32"),
        ({"dataType": "ARRAY", "dataDefinition": {"itemType": "BOOL"}}, 'unknown itemType "BOOL"'),
        (
            {"dataType": "STRUCT", "dataDefinition": {"items": [{"identifier": "s", "dataType": "STRUCT"}]}},
            "a STRUCT member cannot be a STRUCT",
        ),
        ({"dataType": "INT", "identifier": "other"}, 'identifier "other" differs from its key'),
        ("INT", "must be an object with a dataType"),
    ],
)
def test_malformed_points_are_model_errors_naming_file_and_point(point: object, reason: str) -> None:
    """A bad definition is a ModelError naming the file, the point and what is wrong."""
    with pytest.raises(ModelError) as caught:
        compile_point("m.json", "p", point)
    assert caught.value.path == "m.json"
    assert caught.value.reason.startswith('measurepoint "p"')
    assert reason in caught.value.reason
