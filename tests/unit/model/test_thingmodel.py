"""Thing models: loading and refusing model files, and checking measure points against them."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from service.errors import ModelError
from service.model.compiler import DATA_TYPES
from service.model.fasttest import fast_test
from service.model.thingmodel import (
    CheckedPoint,
    PointIssue,
    ThingModel,
    check_paths,
    compile_model,
    load_model,
    load_models,
)

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"

INT: dict[str, Any] = {"dataType": "INT"}
FLOAT: dict[str, Any] = {"dataType": "FLOAT"}
DOUBLE: dict[str, Any] = {"dataType": "DOUBLE"}
BOOL: dict[str, Any] = {"dataType": "BOOL"}
ENUM_INT: dict[str, Any] = {"dataType": "ENUM", "dataDefinition": {"enumType": "INT", "enumDesc": {"0": {}, "1": {}}}}
ENUM_STR: dict[str, Any] = {
    "dataType": "ENUM",
    "dataDefinition": {"enumType": "STRING", "enumDesc": {"on": {}, "off": {}}},
}
STRING4: dict[str, Any] = {"dataType": "STRING", "dataDefinition": {"maxLength": 4}}
STRING: dict[str, Any] = {"dataType": "STRING"}
TIMESTAMP: dict[str, Any] = {"dataType": "TIMESTAMP"}
DATE: dict[str, Any] = {"dataType": "DATE"}
FILE: dict[str, Any] = {"dataType": "FILE"}
QUALITY: dict[str, Any] = {"dataType": "INT", "hasQuality": True}


def array(item_type: str) -> dict[str, Any]:
    return {"dataType": "ARRAY", "dataDefinition": {"itemType": item_type}}


STRUCT: dict[str, Any] = {
    "dataType": "STRUCT",
    "dataDefinition": {
        "items": [
            {"identifier": "a", "dataType": "INT", "required": True},
            {"identifier": "b", "dataType": "STRING", "dataDefinition": {"maxLength": 8}},
            {"identifier": "c", "dataType": "ARRAY", "dataDefinition": {"itemType": "FLOAT"}},
        ]
    },
}


def write(directory: Path, document: object, name: str = "model.json") -> Path:
    path = directory / name
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    return path


def make(tmp_path: Path, points: dict[str, Any], **top: Any) -> ThingModel:
    return load_model(write(tmp_path, {"productKey": "p1", "measurepoints": points, **top}))


def check_one(tmp_path: Path, definition: dict[str, Any], value: object) -> tuple[list[CheckedPoint], list[PointIssue]]:
    return make(tmp_path, {"pt": definition}).check({"pt": value})


ACCEPTED = [
    (INT, 0),
    (INT, -(2**31)),
    (INT, 2**31 - 1),
    (FLOAT, 1),
    (FLOAT, 1.02),
    (FLOAT, -3.4028234663852886e38),
    (DOUBLE, 1e300),
    (DOUBLE, 7),
    (BOOL, True),
    (BOOL, False),
    (ENUM_INT, 0),
    (ENUM_INT, 1),
    (ENUM_STR, "off"),
    (STRING4, "abcd"),
    (STRING4, ""),
    (STRING4, "éé"),
    (STRING, "x" * 1024),
    (STRING, "温度"),
    (STRING, "😀"),
    (TIMESTAMP, 0),
    (TIMESTAMP, 1_700_000_000_000),
    (TIMESTAMP, 253402300799999),
    (DATE, "2024-09-30"),
    (DATE, "2024-09-30 15:30:00"),
    (DATE, "2024-02-29 23:59:59"),
    (array("INT"), []),
    (array("INT"), [1] * 128),
    (array("FLOAT"), [1, 1.5]),
    (array("DOUBLE"), [1e300, 0]),
    (array("STRING"), ["1.02", "2.02", "7.93"]),
    (STRUCT, {"a": 1}),
    (STRUCT, {"a": 1, "b": "12345678", "c": [1.5, 2]}),
    (FILE, "files/report-2024.pdf"),
]


@pytest.mark.parametrize(("definition", "value"), ACCEPTED)
def test_valid_value_is_accepted_as_sent(tmp_path: Path, definition: dict[str, Any], value: object) -> None:
    """A value of the right type and range passes, and is returned unchanged with no quality."""
    good, issues = check_one(tmp_path, definition, value)
    assert issues == []
    assert good == [CheckedPoint("pt", value, None)]


REJECTED = [
    (INT, 2**31, "value 2147483648 out of INT range (int32)"),
    (INT, -(2**31) - 1, "value -2147483649 out of INT range (int32)"),
    (INT, True, "expected INT, got boolean true"),
    (INT, 1.0, "expected INT, got number 1.0"),
    (INT, "1", "expected INT, got string"),
    (INT, None, "expected INT, got null"),
    (FLOAT, "1.02", "expected FLOAT, got string"),
    (FLOAT, 3.5e38, "value 3.5e+38 out of FLOAT range (single precision)"),
    (FLOAT, -(10**39), "out of FLOAT range (single precision)"),
    (FLOAT, float("nan"), "value nan is not a finite number"),
    (FLOAT, float("inf"), "value inf is not a finite number"),
    (FLOAT, False, "expected FLOAT, got boolean false"),
    (DOUBLE, "1", "expected DOUBLE, got string"),
    (DOUBLE, 10**400, "out of DOUBLE range (double precision)"),
    (DOUBLE, float("-inf"), "not a finite number"),
    (BOOL, 1, "expected BOOL, got integer 1"),
    (BOOL, "true", "expected BOOL, got string"),
    (ENUM_INT, 2, "not one of 0, 1"),
    (ENUM_INT, "1", "expected ENUM (INT), got string"),
    (ENUM_INT, True, "expected ENUM (INT), got boolean true"),
    (ENUM_INT, 1.0, "expected ENUM (INT), got number 1.0"),
    (ENUM_STR, "ON", 'not one of "on", "off"'),
    (ENUM_STR, 1, "expected ENUM (STRING), got integer 1"),
    (STRING4, "abcde", "string is 5 bytes, at most 4"),
    (STRING4, "ééé", "string is 6 bytes, at most 4"),
    (STRING4, "€€", "string is 6 bytes, at most 4"),
    (STRING4, 1, "expected STRING, got integer 1"),
    (STRING, "x" * 1025, "string is 1025 bytes, at most 1024"),
    (STRING, "é" * 513, "string is 1026 bytes, at most 1024"),
    (TIMESTAMP, -1, "value -1 out of TIMESTAMP range (0..253402300799999 ms since epoch)"),
    (TIMESTAMP, 253402300800000, "out of TIMESTAMP range"),
    (TIMESTAMP, 1.7e12, "expected TIMESTAMP, got number 1700000000000.0"),
    (TIMESTAMP, "1700000000000", "expected TIMESTAMP, got string"),
    (DATE, "2023-02-29", '"2023-02-29" is not a DATE'),
    (DATE, "2024-13-01", "is not a DATE"),
    (DATE, "2024-09-30T15:30:00", "is not a DATE"),
    (DATE, "2024-09-30 24:00:00", "is not a DATE"),
    (DATE, "0000-01-01", "is not a DATE"),
    (DATE, "２０２４-09-30", "is not a DATE"),
    (DATE, 20240930, "expected DATE, got integer 20240930"),
    (array("INT"), [1] * 129, "array has 129 items, at most 128"),
    (array("INT"), [1, "2"], "item [1]: expected INT, got string"),
    (array("INT"), [True], "item [0]: expected INT, got boolean true"),
    (array("INT"), "1,2", "expected ARRAY, got string"),
    (array("FLOAT"), [1.5, "1.02"], "item [1]: expected FLOAT, got string"),
    (array("DOUBLE"), [None], "item [0]: expected DOUBLE, got null"),
    (array("STRING"), [1.02], "item [0]: expected STRING, got number 1.02"),
    (array("STRING"), ["x" * 1025], "item [0]: string is 1025 bytes, at most 1024"),
    (STRUCT, {}, 'missing required member "a"'),
    (STRUCT, {"a": 1, "z": 2}, 'unknown member "z"'),
    (STRUCT, {"a": "1"}, 'member "a": expected INT, got string'),
    (STRUCT, {"a": 1, "b": "123456789"}, 'member "b": string is 9 bytes, at most 8'),
    (STRUCT, {"a": 1, "c": [1, "x"]}, 'member "c": item [1]: expected FLOAT, got string'),
    (STRUCT, [1], "expected STRUCT, got array"),
    (FILE, "x" * 1025, "string is 1025 bytes, at most 1024"),
    (FILE, 1, "expected FILE, got integer 1"),
]


@pytest.mark.parametrize(("definition", "value", "reason"), REJECTED)
def test_invalid_value_is_rejected_with_reason(
    tmp_path: Path, definition: dict[str, Any], value: object, reason: str
) -> None:
    """A value of the wrong type, range, size or shape is an issue whose reason says what is wrong."""
    good, issues = check_one(tmp_path, definition, value)
    assert good == []
    assert [issue.identifier for issue in issues] == ["pt"]
    assert reason in issues[0].reason


TEXT_HOLDERS: list[tuple[dict[str, Any], Callable[[str], object]]] = [
    (STRING, lambda text: text),
    (DATE, lambda text: text),
    (FILE, lambda text: text),
    (array("STRING"), lambda text: ["ok", text]),
    (STRUCT, lambda text: {"a": 1, "b": text}),
]


@pytest.mark.parametrize(("definition", "wrap"), TEXT_HOLDERS)
@pytest.mark.parametrize(
    ("text", "reason"),
    [("a\x00b", "string contains U+0000 (NUL)"), ("a\ud800", "string contains a lone surrogate U+D800")],
)
def test_unstorable_text_is_rejected_wherever_it_is(
    tmp_path: Path, definition: dict[str, Any], wrap: Callable[[str], object], text: str, reason: str
) -> None:
    """NUL and lone surrogates, which PostgreSQL cannot store, are refused in every string a value holds."""
    _, issues = check_one(tmp_path, definition, wrap(text))
    assert len(issues) == 1
    assert reason in issues[0].reason
    str(issues[0]).encode("utf-8")  # the reason itself must be sendable


QUALITY_REJECTED = [
    (1, 'expected {"value", "quality"} object (hasQuality), got integer 1'),
    ({"value": 1}, 'expected {"value", "quality"} object (hasQuality), missing "quality"'),
    ({"quality": 1}, 'expected {"value", "quality"} object (hasQuality), missing "value"'),
    ({"value": 1, "quality": 1, "q": 1}, 'expected {"value", "quality"} object (hasQuality), unexpected key "q"'),
    ({"value": "1", "quality": 1}, "expected INT, got string"),
    ({"value": 1, "quality": -1}, "quality: value -1 out of INT range (0..32767)"),
    ({"value": 1, "quality": 32768}, "quality: value 32768 out of INT range (0..32767)"),
    ({"value": 1, "quality": True}, "quality: expected INT, got boolean true"),
    ({"value": 1, "quality": 9.0}, "quality: expected INT, got number 9.0"),
    ({"value": 1, "quality": "9"}, "quality: expected INT, got string"),
]


@pytest.mark.parametrize(("value", "reason"), QUALITY_REJECTED)
def test_quality_point_needs_exactly_value_and_quality(tmp_path: Path, value: object, reason: str) -> None:
    """A hasQuality point must be {"value": <typed>, "quality": <int 0..32767>}, nothing more or less."""
    good, issues = check_one(tmp_path, QUALITY, value)
    assert good == []
    assert [str(issue) for issue in issues] == [f"pt: {reason}"]


@pytest.mark.parametrize("quality", [0, 9, 32767])
def test_quality_point_is_unwrapped(tmp_path: Path, quality: int) -> None:
    """A good hasQuality point yields the bare value and its quality separately."""
    good, issues = check_one(tmp_path, QUALITY, {"value": -5, "quality": quality})
    assert issues == []
    assert good == [CheckedPoint("pt", -5, quality)]


def test_quality_is_none_without_has_quality(tmp_path: Path) -> None:
    """A point without hasQuality treats a {"value", "quality"} object as a wrong type, not as a quality."""
    _, issues = check_one(tmp_path, INT, {"value": 1, "quality": 9})
    assert [issue.reason for issue in issues] == ["expected INT, got object"]


def test_every_failing_point_is_reported(tmp_path: Path) -> None:
    """check never stops at the first bad point: every one gets an issue, in payload order, and good ones pass."""
    model = make(tmp_path, {"a": INT, "b": FLOAT, "c": BOOL, "d": STRING})
    good, issues = model.check({"a": "x", "b": 2.5, "c": 1, "zz": 1, "d": "ok"})
    assert [point.identifier for point in good] == ["b", "d"]
    assert [str(issue) for issue in issues] == [
        "a: expected INT, got string",
        "c: expected BOOL, got integer 1",
        "zz: not defined in the model",
    ]


def test_unknown_identifier_is_an_issue_when_validating(tmp_path: Path) -> None:
    """With validate true (the default) a point the model does not define is refused."""
    model = make(tmp_path, {"a": INT})
    assert model.validate is True
    assert model.check({"b": 1}) == ([], [PointIssue("b", "not defined in the model")])


def test_unknown_identifier_is_accepted_bare_when_not_validating(tmp_path: Path) -> None:
    """With validate false an undefined point is kept as sent (even an object), with no quality."""
    model = make(tmp_path, {"a": INT}, validate=False)
    good, issues = model.check({"a": 1, "free": {"value": 1, "quality": 2}, "list": [1, "x", None]})
    assert issues == []
    assert good == [
        CheckedPoint("a", 1, None),
        CheckedPoint("free", {"value": 1, "quality": 2}, None),
        CheckedPoint("list", [1, "x", None], None),
    ]


def test_defined_points_are_still_checked_when_not_validating(tmp_path: Path) -> None:
    """validate false only admits undefined points; a defined point must still match its type."""
    model = make(tmp_path, {"a": INT}, validate=False)
    assert model.check({"a": "1"}) == ([], [PointIssue("a", "expected INT, got string")])


@pytest.mark.parametrize(
    ("identifier", "value", "reason", "shown"),
    [
        ("free", {"k": ["ok", "a\x00"]}, 'member "k": item [1]: string contains U+0000 (NUL)', "free"),
        ("free", ["\udc00"], "item [0]: string contains a lone surrogate U+DC00", "free"),
        ("free", {"a\x00": 1}, "key contains U+0000 (NUL)", "free"),
        ("free", [10**400], "does not fit a double", "free"),
        ("free", float("nan"), "number nan does not fit a double", "free"),
        ("", 1, "identifier must be a non-empty string", '""'),
        ("a\x00b", 1, "identifier contains U+0000 (NUL)", '"a\\u0000b"'),
        ("a\ud800", 1, "identifier contains a lone surrogate U+D800", '"a\\ud800"'),
    ],
)
def test_undefined_point_must_still_be_storable(
    tmp_path: Path, identifier: str, value: object, reason: str, shown: str
) -> None:
    """Without validation, an undefined point's identifier and every string and number in it must be storable."""
    model = make(tmp_path, {"a": INT}, validate=False)
    good, issues = model.check({identifier: value})
    assert good == []
    assert [issue.identifier for issue in issues] == [shown]
    assert issues[0].reason.endswith(reason)
    str(issues[0]).encode("utf-8")  # a refused identifier is echoed escaped, never raw


def test_deeply_nested_undefined_point_is_refused_without_exhausting_the_stack(tmp_path: Path) -> None:
    """A value nested 100 000 deep is refused by the nesting limit, not a RecursionError (the walk is iterative).

    The JSON encoder that stores values stops at 255 levels: such a value used to pass validation and fail in
    the writer (issue 8 #7).
    """
    model = make(tmp_path, {"a": INT}, validate=False)
    value: object = "bad\x00"
    for _ in range(100_000):
        value = [value]
    _, issues = model.check({"deep": value})
    assert len(issues) == 1
    assert issues[0].reason == "value nested deeper than 64 levels"


def test_nesting_up_to_the_limit_is_stored_and_still_checked(tmp_path: Path) -> None:
    """64 levels are accepted as they are; a bad string inside them is still found and named."""
    model = make(tmp_path, {"a": INT}, validate=False)
    fine: object = 1
    bad: object = "bad\x00"
    for _ in range(64):
        fine, bad = [fine], [bad]
    good, issues = model.check({"fine": fine, "bad": bad})
    assert [point.identifier for point in good] == ["fine"]
    assert [issue.identifier for issue in issues] == ["bad"]
    assert issues[0].reason.endswith("string contains U+0000 (NUL)")


def test_unicode_identifiers_validate(tmp_path: Path) -> None:
    """Identifiers in any script, such as "温度", are defined and checked like any other."""
    model = make(tmp_path, {"温度": FLOAT, "état": STRUCT | {"dataType": "struct"}})
    good, issues = model.check({"温度": 21.5, "état": {"a": 1}})
    assert issues == []
    assert [point.identifier for point in good] == ["温度", "état"]
    assert str(model.check({"温度": "21.5"})[1][0]) == "温度: expected FLOAT, got string"


def test_data_type_names_are_case_insensitive(tmp_path: Path) -> None:
    """dataType, enumType and itemType are read case-insensitively and stored upper-case."""
    model = make(
        tmp_path,
        {
            "a": {"dataType": "int"},
            "b": {"dataType": "Float"},
            "c": {"dataType": "array", "dataDefinition": {"itemType": "string"}},
            "d": {"dataType": "enum", "dataDefinition": {"enumType": "int", "enumDesc": {"1": {}}}},
        },
    )
    assert {name: spec.data_type for name, spec in model.points.items()} == {
        "a": "INT",
        "b": "FLOAT",
        "c": "ARRAY",
        "d": "ENUM",
    }
    assert model.check({"a": 1, "b": 1.5, "c": ["x"], "d": 1})[1] == []
    assert model.check({"c": [1]})[1] == [PointIssue("c", "item [0]: expected STRING, got integer 1")]


def test_long_enum_lists_are_cut_short_in_reasons(tmp_path: Path) -> None:
    """A reason names at most ten enum values, then says how many there are."""
    definition = {
        "dataType": "ENUM",
        "dataDefinition": {"enumType": "INT", "enumDesc": {str(n): {} for n in range(25)}},
    }
    _, issues = check_one(tmp_path, definition, 99)
    assert issues[0].reason == "not one of 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, … (25 values in all)"


def test_point_issue_str_names_the_point() -> None:
    """str(PointIssue) is "identifier: reason", the form the reply message lists."""
    assert str(PointIssue("temp", "expected FLOAT, got string")) == "temp: expected FLOAT, got string"


def test_compiled_schemas_are_draft_2020_12(tmp_path: Path) -> None:
    """Every compiled point schema declares and passes the Draft 2020-12 metaschema."""
    model = load_model(SCHEMAS / "allTypes01.json")
    for spec in model.points.values():
        assert spec.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(spec.schema)


def test_shipped_models_load(tmp_path: Path) -> None:
    """Both example models in schemas/ load, keyed by productKey, and allTypes01 uses every dataType."""
    models = load_models(SCHEMAS)
    assert set(models) == {"inverter01", "allTypes01"}
    all_types = models["allTypes01"]
    assert {spec.data_type for spec in all_types.points.values()} == set(DATA_TYPES)
    assert any(spec.has_quality for spec in all_types.points.values())
    assert models["inverter01"].path == str(SCHEMAS / "inverter01.json")


def test_inverter_model_accepts_the_enos_sample() -> None:
    """inverter01 accepts EnOS's documented sample payload and unwraps Power's quality."""
    model = load_model(SCHEMAS / "inverter01.json")
    sample = {"temp": 1.02, "branchCurr": ["1.02", "2.02", "7.93"], "Power": {"value": 1, "quality": 9}}
    good, issues = model.check(sample)
    assert issues == []
    assert good == [
        CheckedPoint("temp", 1.02, None),
        CheckedPoint("branchCurr", ["1.02", "2.02", "7.93"], None),
        CheckedPoint("Power", 1, 9),
    ]


def test_all_types_model_accepts_a_full_payload() -> None:
    """allTypes01 accepts one good value for each of its points."""
    model = load_model(SCHEMAS / "allTypes01.json")
    payload = {
        "intPoint": {"value": 42, "quality": 0},
        "floatPoint": 21.5,
        "doublePoint": 1e300,
        "boolPoint": True,
        "enumIntPoint": 2,
        "enumStringPoint": "high",
        "stringPoint": "héllo",
        "timestampPoint": 1_700_000_000_000,
        "datePoint": "2024-09-30 15:30:00",
        "intArrayPoint": [1, 2, 3],
        "floatArrayPoint": [1.5],
        "doubleArrayPoint": [2.5],
        "stringArrayPoint": ["a"],
        "structPoint": {"voltage": 230, "phase": "A", "samples": [1, 2]},
        "filePoint": "files/1.bin",
    }
    good, issues = model.check(payload)
    assert issues == []
    assert len(good) == len(model.points) == len(payload)


def _points(**points: Any) -> dict[str, Any]:
    return {"productKey": "p1", "measurepoints": points}


def _member(**member: Any) -> dict[str, Any]:
    return _points(s={"dataType": "STRUCT", "dataDefinition": {"items": [member]}})


MALFORMED: list[tuple[object, str]] = [
    ("{", "invalid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ('{"productKey": "p1", "productKey": "p2", "measurepoints": {}}', 'invalid JSON: duplicate key "productKey"'),
    ('{"productKey": "p1", "measurepoints": {"a": {"dataType": "FLOAT", "x": NaN}}}', "NaN is not JSON"),
    ([], "a thing model must be a JSON object"),
    ({"measurepoints": {}}, "productKey must be a non-empty string"),
    ({"productKey": "", "measurepoints": {}}, "productKey must be a non-empty string"),
    ({"productKey": 5, "measurepoints": {}}, "productKey must be a non-empty string"),
    ({"productKey": "a/b", "measurepoints": {}}, "productKey cannot contain '/', '+' or '#'"),
    ({"productKey": "p1"}, "measurepoints must be an object"),
    ({"productKey": "p1", "measurepoints": []}, "measurepoints must be an object"),
    ({"productKey": "p1", "validate": "yes", "measurepoints": {}}, "validate must be true or false"),
    ({"productKey": "p1", "measurepoint": {}}, 'unknown key "measurepoint"'),
    (_points(a={"dataType": "STRUCTURE"}), 'measurepoint "a": unknown dataType "STRUCTURE" (expected one of ARRAY'),
    (_points(a={"desc": "no type"}), 'measurepoint "a": dataType is missing'),
    (_points(a="INT"), 'measurepoint "a": must be an object'),
    (_points(**{"": INT}), 'measurepoint "": identifier must be a non-empty string'),
    (_points(**{"a\x00": INT}), "identifier contains U+0000 (NUL)"),
    (_points(a={"dataType": "INT", "identifier": "b"}), 'identifier "b" differs from its key'),
    (_points(a={"dataType": "INT", "hasQualty": True}), 'measurepoint "a": unknown key "hasQualty"'),
    (_points(a={"dataType": "INT", "hasQuality": "true"}), "hasQuality must be true or false"),
    (_points(a={"dataType": "INT", "dataDefinition": {"maxLength": 4}}), 'dataDefinition: unknown key "maxLength"'),
    (_points(a={"dataType": "INT", "dataDefinition": []}), "dataDefinition must be an object"),
    (_points(a={"dataType": "ARRAY", "dataDefinition": {"itemType": "BOOL"}}), 'unknown itemType "BOOL"'),
    (_points(a={"dataType": "ARRAY"}), "itemType is missing"),
    (_points(a={"dataType": "ENUM"}), "enumType is missing"),
    (_points(a={"dataType": "ENUM", "dataDefinition": {"enumType": "INT"}}), "ENUM needs dataDefinition.enumDesc"),
    (_points(a={"dataType": "ENUM", "dataDefinition": {"enumType": "INT", "enumDesc": {}}}), "a non-empty object"),
    (
        _points(a={"dataType": "ENUM", "dataDefinition": {"enumType": "INT", "enumDesc": {"on": {}}}}),
        'enumDesc key "on" is not a decimal int32 (enumType INT)',
    ),
    (
        _points(a={"dataType": "ENUM", "dataDefinition": {"enumType": "INT", "enumDesc": {"1.5": {}}}}),
        'enumDesc key "1.5" is not a decimal int32',
    ),
    (
        _points(a={"dataType": "ENUM", "dataDefinition": {"enumType": "INT", "enumDesc": {"3000000000": {}}}}),
        'enumDesc key "3000000000" is not a decimal int32',
    ),
    (
        _points(a={"dataType": "ENUM", "dataDefinition": {"enumType": "INT", "enumDesc": {"1": {}, "01": {}}}}),
        "enumDesc keys repeat the value 1",
    ),
    (
        _points(a={"dataType": "ENUM", "dataDefinition": {"enumType": "STRING", "enumDesc": {"": {}}}}),
        "enumDesc key must be a non-empty string",
    ),
    (
        _points(a={"dataType": "STRING", "dataDefinition": {"maxLength": 0}}),
        "maxLength must be an integer from 1 to 1024",
    ),
    (_points(a={"dataType": "STRING", "dataDefinition": {"maxLength": 1025}}), "maxLength must be an integer from 1"),
    (_points(a={"dataType": "STRING", "dataDefinition": {"maxLength": "64"}}), "maxLength must be an integer from 1"),
    (_points(a={"dataType": "STRING", "dataDefinition": {"maxLength": 64.0}}), "maxLength must be an integer from 1"),
    (_points(a={"dataType": "STRING", "dataDefinition": {"maxLength": True}}), "maxLength must be an integer from 1"),
    (_points(s={"dataType": "STRUCT"}), "STRUCT needs dataDefinition.items, a non-empty list"),
    (_points(s={"dataType": "STRUCT", "dataDefinition": {"items": []}}), "STRUCT needs dataDefinition.items"),
    (_member(identifier="n", dataType="struct", dataDefinition={"items": []}), "a STRUCT member cannot be a STRUCT"),
    (_member(identifier="", dataType="INT"), 'measurepoint "s": member [0]: identifier must be a non-empty string'),
    (_member(identifier="m"), 'measurepoint "s": member "m": dataType is missing'),
    (_member(identifier="m", dataType="INT", required="yes"), 'member "m": required must be true or false'),
    (_member(identifier="m", dataType="INT", hasQuality=True), 'member [0]: unknown key "hasQuality"'),
    (
        _points(s={"dataType": "STRUCT", "dataDefinition": {"items": [INT | {"identifier": "m"}] * 2}}),
        'member "m" is defined twice',
    ),
]


@pytest.mark.parametrize(("document", "reason"), MALFORMED)
def test_malformed_model_is_refused_naming_file_and_reason(tmp_path: Path, document: object, reason: str) -> None:
    """A malformed model raises ModelError carrying the file's path and a reason a person can act on."""
    path = write(tmp_path, document)
    with pytest.raises(ModelError) as caught:
        load_model(path)
    assert caught.value.path == str(path)
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}: ")


def test_model_not_utf8_is_refused(tmp_path: Path) -> None:
    """A model file that is not UTF-8 is refused with the offending byte's position."""
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"productKey": "caf\xe9", "measurepoints": {}}')
    with pytest.raises(ModelError, match=r"not UTF-8 \(byte 19\)"):
        load_model(path)


def test_model_with_utf8_bom_loads(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark, as some editors write, does not break loading."""
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_points(a=INT)).encode())
    assert load_model(path).product_key == "p1"


def test_model_keeps_defaults_and_descriptive_keys(tmp_path: Path) -> None:
    """validate defaults to true, hasQuality to false, and name/desc/unit/signalType/tags are ignored."""
    point = {
        "dataType": "FLOAT",
        "name": {"en": "T"},
        "desc": "d",
        "unit": {"unitId": "°C"},
        "signalType": "AI",
        "tags": {},
    }
    model = make(tmp_path, {"t": point}, name="Product", desc="A product")
    assert model.validate is True
    assert model.points["t"].has_quality is False
    assert model.check({"t": 1.5}) == ([CheckedPoint("t", 1.5, None)], [])


def test_load_models_keys_by_product_and_skips_other_files(tmp_path: Path) -> None:
    """load_models reads every *.json in the directory, keyed by productKey, and ignores other files."""
    write(tmp_path, {"productKey": "b", "measurepoints": {}}, "1.json")
    write(tmp_path, {"productKey": "a", "measurepoints": {"x": INT}}, "2.json")
    (tmp_path / "README.md").write_text("not a model", encoding="utf-8")
    models = load_models(tmp_path)
    assert list(models) == ["b", "a"]  # file order, sorted by name
    assert models["a"].path == str(tmp_path / "2.json")


def test_load_models_refuses_duplicate_product_key(tmp_path: Path) -> None:
    """Two files defining one productKey are refused, naming both files."""
    first = write(tmp_path, {"productKey": "p", "measurepoints": {}}, "a.json")
    second = write(tmp_path, {"productKey": "p", "measurepoints": {}}, "b.json")
    with pytest.raises(ModelError) as caught:
        load_models(tmp_path)
    assert caught.value.path == str(second)
    assert caught.value.reason == f'productKey "p" is already defined by {first}'


@pytest.mark.parametrize(("name", "reason"), [("missing", "no such directory"), ("empty", "no thing model files")])
def test_load_models_refuses_missing_or_empty_directory(tmp_path: Path, name: str, reason: str) -> None:
    """A broker with no models would refuse everything, so a missing or empty directory is an error."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=reason):
        load_models(tmp_path / name)


def test_load_models_stops_at_a_bad_file(tmp_path: Path) -> None:
    """One malformed file makes load_models fail, naming that file."""
    write(tmp_path, _points(a=INT), "good.json")
    bad = write(tmp_path, _points(a={"dataType": "NOPE"}), "zbad.json")
    with pytest.raises(ModelError) as caught:
        load_models(tmp_path)
    assert caught.value.path == str(bad)


def test_check_paths_collects_every_error(tmp_path: Path) -> None:
    """check_paths reports every bad file, missing path, empty directory and duplicate, not just the first."""
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "empty").mkdir()
    good = write(models, {"productKey": "g", "measurepoints": {"a": INT}}, "good.json")
    bad_json = write(models, "{oops", "bad1.json")
    bad_type = write(models, _points(a={"dataType": "NOPE"}), "bad2.json")
    dup = write(tmp_path, {"productKey": "g", "measurepoints": {}}, "dup.json")
    errors = check_paths([models, tmp_path / "missing.json", tmp_path / "empty", dup, good])
    assert [(error.path, error.reason.split(":")[0]) for error in errors] == [
        (str(tmp_path / "missing.json"), "no such file or directory"),
        (str(tmp_path / "empty"), "no thing model files (*.json) in this directory"),
        (str(bad_json), "invalid JSON"),
        (str(bad_type), 'measurepoint "a"'),
        (str(dup), f'productKey "g" is already defined by {good}'),
    ]


def test_check_paths_is_empty_for_good_models() -> None:
    """The shipped models pass check_paths, whether named as a directory or as files."""
    assert check_paths([SCHEMAS]) == []
    assert check_paths([SCHEMAS / "inverter01.json", SCHEMAS]) == []


AGREEMENT_CASES = (
    [(definition, value) for definition, value in ACCEPTED]
    + [(definition, value) for definition, value, _ in REJECTED]
    + [(QUALITY, value) for value, _ in QUALITY_REJECTED]
    + [(QUALITY, {"value": 1, "quality": 9})]
    + [(definition, wrap(text)) for definition, wrap in TEXT_HOLDERS for text in ("a\x00b", "a\ud800", "ok")]
)


@pytest.mark.parametrize(("definition", "value"), AGREEMENT_CASES)
def test_fast_test_agrees_with_jsonschema(tmp_path: Path, definition: dict[str, Any], value: Any) -> None:
    """The plain-Python fast path accepts exactly what the compiled JSON Schema accepts, case by case."""
    spec = make(tmp_path, {"pt": definition}).points["pt"]
    assert spec.fast_test(value) is spec.validator.is_valid(value)


def _random_value(rng: random.Random, depth: int = 0) -> object:
    scalars: list[object] = [
        0, 1, -1, True, False, None, 1.0, 1.5, float("nan"), float("inf"), 2**31 - 1, 2**31, -(2**31) - 1,
        32767, 32768, 253402300799999, 253402300800000, 3.5e38, 10**400, "", "x", "é" * 40, "a\x00", "\ud800",
        "2024-02-29", "2023-02-29", "2024-09-30 15:30:00", "low", "A", "on", "files/x",
    ]  # fmt: skip
    roll = rng.random()
    if depth < 3 and roll < 0.15:
        sizes = [0, 1, 3, 128, 129] if depth == 0 else [0, 1, 2]
        return [_random_value(rng, depth + 1) for _ in range(rng.choice(sizes))]
    if depth < 3 and roll < 0.3:
        keys = ["value", "quality", "voltage", "phase", "note", "samples", "a", "b", "c", "zz"]
        return {key: _random_value(rng, depth + 1) for key in rng.sample(keys, rng.randint(0, 4))}
    return rng.choice(scalars)


def test_fast_test_agrees_with_jsonschema_on_random_values() -> None:
    """On thousands of random edge-case values, every shipped point's fast path matches jsonschema exactly."""
    rng = random.Random(20240930)
    specs = [spec for model in load_models(SCHEMAS).values() for spec in model.points.values()]
    verdicts: dict[bool, int] = {True: 0, False: 0}
    disagreements = []
    for _ in range(3000):
        value: Any = _random_value(rng)
        for spec in specs:
            verdict = spec.validator.is_valid(value)
            verdicts[verdict] += 1
            if spec.fast_test(value) is not verdict:
                disagreements.append((spec.identifier, value))
    assert disagreements == []
    assert min(verdicts.values()) > 1000  # both outcomes were really exercised


def test_fast_test_refuses_a_keyword_it_cannot_apply() -> None:
    """A schema keyword the fast path does not implement is an error, never a rule silently skipped."""
    with pytest.raises(ValueError, match="'pattern'"):
        fast_test({"type": "string", "pattern": "^a"})


def test_compile_model_needs_no_file() -> None:
    """compile_model turns a parsed document into a model without touching the disk, naming ``where`` on errors."""
    model = compile_model({"productKey": "mem", "measurepoints": {"a": INT}}, "inline")
    assert (model.product_key, model.path) == ("mem", "inline")
    assert model.check({"a": 1})[1] == []
    with pytest.raises(ModelError, match=r"^inline: measurepoints must be an object"):
        compile_model({"productKey": "mem"}, "inline")
