"""service.model.keywords: the keywords our rules add to JSON Schema, and PointValidator, which applies them."""

from __future__ import annotations

from typing import Any

import pytest

from service.model.keywords import PointValidator, is_date, is_strict_int


def errors(schema: dict[str, Any], value: Any) -> list[str]:
    return [error.message for error in PointValidator(schema).iter_errors(value)]


def test_integer_is_strict() -> None:
    """``integer`` accepts ints only: not 1.0 (Draft 2020-12 would) and not booleans."""
    assert errors({"type": "integer"}, 1) == []
    assert errors({"type": "integer"}, 1.0) != []
    assert errors({"type": "integer"}, True) != []
    assert is_strict_int(None, 3) and not is_strict_int(None, False)


def test_no_nul_and_well_formed_unicode() -> None:
    """``noNul`` and ``wellFormedUnicode`` refuse the text PostgreSQL cannot store, with the storable wording."""
    assert errors({"noNul": True}, "a\x00") == ["string contains U+0000 (NUL)"]
    assert errors({"wellFormedUnicode": True}, "a\ud800") == ["string contains a lone surrogate U+D800"]
    assert errors({"noNul": True, "wellFormedUnicode": True}, "ok é") == []


def test_max_bytes_counts_utf8_bytes_not_characters() -> None:
    """``maxBytes`` limits the UTF-8 size: four 2-byte characters are 8 bytes, over a limit of 6."""
    assert errors({"maxBytes": 6}, "éééé") == ["string is 8 bytes, at most 6"]
    assert errors({"maxBytes": 6}, "éée") == []


def test_finite_refuses_nan_and_infinity() -> None:
    """``finite`` refuses NaN and ±inf, which a lenient JSON parser lets through."""
    assert errors({"finite": True}, float("nan")) == ["value nan is not a finite number"]
    assert errors({"finite": True}, 1.5) == []


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("2024-02-29", True),
        ("2024-09-30 15:30:00", True),
        ("2023-02-29", False),  # not a leap year
        ("2024-09-30 24:00:00", False),
        ("2024-9-30", False),
        ("2024-09-30T15:30:00", False),
    ],
)
def test_calendar_date(text: str, ok: bool) -> None:
    """``calendarDate`` wants YYYY-MM-DD[ HH:MM:SS] naming a real date and time."""
    assert is_date(text) is ok
    assert (errors({"calendarDate": True}, text) == []) is ok


def test_calendar_date_error_quotes_the_value() -> None:
    """The DATE refusal quotes the value and says the two accepted shapes."""
    assert errors({"calendarDate": True}, "soon") == [
        '"soon" is not a DATE ("YYYY-MM-DD" or "YYYY-MM-DD HH:MM:SS", a real calendar date)'
    ]
