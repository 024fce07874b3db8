"""service.model.storable: which text, numbers and names PostgreSQL can store, and where in a value they fail."""

from __future__ import annotations

import pytest

from service.model.storable import (
    MAX_NESTING,
    name_problem,
    nul_problem,
    surrogate_problem,
    text_problem,
    tree_problem,
)


def test_text_problems_name_nul_and_lone_surrogates() -> None:
    """NUL and a lone surrogate are named (with its code point); ordinary Unicode is fine."""
    assert nul_problem("a\x00") == "string contains U+0000 (NUL)"
    assert surrogate_problem("x\udc01") == "string contains a lone surrogate U+DC01"
    assert text_problem("温度 °C") is None
    assert text_problem("a\x00\ud800") == "string contains U+0000 (NUL)"  # the first problem found


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("temp", None),
        ("", "identifier must be a non-empty string"),
        (5, "identifier must be a non-empty string"),
        ("a\x00", "identifier contains U+0000 (NUL)"),
    ],
)
def test_name_problem(name: object, problem: str | None) -> None:
    """A name must be a non-empty storable string; the reason starts with what was being named."""
    assert name_problem(name) == problem


def test_name_problem_words_what_was_named() -> None:
    """The ``what`` argument leads the reason (productKey, enumDesc key, …)."""
    assert name_problem("", "productKey") == "productKey must be a non-empty string"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"a": [1, "ok", None, True, 1.5]}, None),
        ({"a": [1, "x\x00"]}, 'member "a": item [1]: string contains U+0000 (NUL)'),
        ({"k\ud800": 1}, "key contains a lone surrogate U+D800"),
        ([[10**400]], "item [0]: item [0]: number 1000000000000000000000000000000000000… does not fit a double"),
        (float("nan"), "number nan does not fit a double"),
        (float("-inf"), "number -inf does not fit a double"),
    ],
)
def test_tree_problem_names_the_path_to_the_first_bad_node(value: object, problem: str | None) -> None:
    """Every string, key and number in a nested value is checked; the reason spells the path to the bad one."""
    assert tree_problem(value) == problem


def test_tree_problem_limits_nesting_without_recursion() -> None:
    """64 levels of nesting are checked; deeper is refused, even far past Python's stack depth."""
    value: object = "ok"
    for _ in range(MAX_NESTING):
        value = [value]
    assert tree_problem(value) is None
    assert tree_problem([value]) == f"value nested deeper than {MAX_NESTING} levels"
    for _ in range(50_000):
        value = {"k": value}
    assert tree_problem(value) == f"value nested deeper than {MAX_NESTING} levels"
