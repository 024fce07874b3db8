"""Events in thing models: EnOS's event shape compiles, a malformed one is refused, output values are checked."""

from __future__ import annotations

from typing import Any

import pytest

from service.errors import ModelError
from service.model.thingmodel import PointIssue, compile_model, load_model
from service.resources import schemas_dir


def model(events: object, *, validate: bool = True) -> Any:
    return compile_model({"productKey": "pk", "validate": validate, "measurepoints": {}, "events": events}, "m.json")


ALARM = {
    "eventType": "warn",
    "desc": "ignored, like a point's",
    "outputData": [
        {"identifier": "temp", "dataType": "FLOAT", "required": True},
        {
            "identifier": "mode",
            "dataType": "ENUM",
            "dataDefinition": {"enumType": "INT", "enumDesc": {"0": {}, "1": {}}},
        },
        {
            "identifier": "detail",
            "dataType": "STRUCT",
            "dataDefinition": {"items": [{"identifier": "a", "dataType": "INT", "required": True}]},
        },
    ],
}


def test_event_compiles_with_type_and_parameters() -> None:
    """An event compiles to its upper-cased type and one checked parameter per outputData entry."""
    spec = model({"alarm": ALARM}).events["alarm"]
    assert spec.event_type == "WARN"
    assert list(spec.params) == ["temp", "mode", "detail"]
    assert spec.required == ("temp",)
    assert spec.params["mode"].data_type == "ENUM"


def test_model_without_events_has_none() -> None:
    """``events`` is optional: a model of points only has an empty event table."""
    document = {"productKey": "pk", "measurepoints": {}}
    assert dict(compile_model(document).events) == {}


def test_good_event_values_pass() -> None:
    """Values of the right types, required ones present, give no issue."""
    alarm = model({"alarm": ALARM})
    assert alarm.check_event("alarm", {"temp": 1, "mode": 0, "detail": {"a": 3}}) == []
    assert alarm.check_event("alarm", {"temp": 80.5}) == []


def test_every_bad_parameter_is_worded() -> None:
    """Each failing output parameter is named with the same reason a measure point would get."""
    issues = model({"alarm": ALARM}).check_event("alarm", {"temp": "hot", "mode": 7, "detail": {}, "extra": 1})
    assert issues == [
        PointIssue("temp", "expected FLOAT, got string"),
        PointIssue("mode", "not one of 0, 1"),
        PointIssue("detail", 'missing required member "a"'),
        PointIssue("extra", "not an output parameter of event alarm"),
    ]


def test_missing_required_parameter_is_an_issue() -> None:
    """A required output parameter left out is reported by name."""
    assert model({"alarm": ALARM}).check_event("alarm", {"mode": 1}) == [
        PointIssue("temp", "required output parameter missing")
    ]


def test_unknown_event_is_an_issue_when_validating() -> None:
    """An event id the model does not define is one issue naming the product."""
    assert model({"alarm": ALARM}).check_event("nope", {"x": 1}) == [
        PointIssue("nope", "event not defined in the model of pk")
    ]


def test_without_validation_unknown_events_and_parameters_pass_if_storable() -> None:
    """With validate false an undefined event or parameter is accepted as sent, unless it cannot be stored."""
    lax = model({"alarm": ALARM}, validate=False)
    assert lax.check_event("nope", {"x": [1, "a"]}) == []
    assert lax.check_event("alarm", {"temp": 1.0, "extra": True}) == []
    assert lax.check_event("nope", {"x": "a\x00b"}) == [PointIssue("x", "string contains U+0000 (NUL)")]
    # a defined parameter is still checked
    assert lax.check_event("alarm", {"temp": "hot"}) == [PointIssue("temp", "expected FLOAT, got string")]


@pytest.mark.parametrize(
    ("events", "reason"),
    [
        ([], "events must be an object of identifier -> definition"),
        ({"a": 1}, 'event "a": must be an object with an eventType and outputData'),
        ({"a": {"outputData": []}}, 'event "a": eventType is missing (one of INFO, WARN, ERROR)'),
        ({"a": {"eventType": "FATAL"}}, 'event "a": unknown eventType "FATAL" (expected one of INFO, WARN, ERROR)'),
        ({"a": {"eventType": "INFO", "outputData": {}}}, 'event "a": outputData must be a list of parameters'),
        ({"a": {"eventType": "INFO", "typo": 1}}, 'event "a": unknown key "typo"'),
        ({"a": {"eventType": "INFO", "identifier": "b"}}, 'event "a": identifier "b" differs from its key'),
        ({"a": {"eventType": "INFO", "outputData": [3]}}, 'event "a": outputData [0] must be an object'),
        (
            {"a": {"eventType": "INFO", "outputData": [{"identifier": "x", "dataType": "LONG"}]}},
            'unknown dataType "LONG"',
        ),
        (
            {"a": {"eventType": "INFO", "outputData": [{"identifier": "x", "dataType": "INT"}] * 2}},
            'event "a": output parameter "x" is defined twice',
        ),
        (
            {"a": {"eventType": "INFO", "outputData": [{"identifier": "x", "dataType": "INT", "required": "y"}]}},
            "required must be true or false",
        ),
        (
            {"a": {"eventType": "INFO", "outputData": [{"dataType": "INT"}]}},
            "identifier must be a non-empty string",
        ),
    ],
)
def test_malformed_event_is_refused_with_reason(events: object, reason: str) -> None:
    """A malformed event definition stops the model from loading, naming the file, the event and the problem."""
    with pytest.raises(ModelError) as caught:
        model(events)
    assert caught.value.path == "m.json"
    assert reason in caught.value.reason


def test_shipped_inverter_model_has_its_events() -> None:
    """schemas/inverter01.json defines overTemp (WARN) and fault (ERROR)."""
    events = load_model(schemas_dir() / "inverter01.json").events
    assert {name: spec.event_type for name, spec in events.items()} == {"overTemp": "WARN", "fault": "ERROR"}
