"""What PostgreSQL can store: text without NUL or lone surrogates, numbers within a double, usable names.

``json.loads`` lets both kinds of bad text through, and a value of a point the model does not define gets
no schema at all, only ``tree_problem``'s walk. Pure.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Final

from service.protocol.replies import quote, show

DOUBLE_MAX: Final = sys.float_info.max
MAX_NESTING: Final = 64  # arrays/objects inside a point value outside the model (orjson stops at 255)

_SURROGATE = re.compile("[\ud800-\udfff]")


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


def name_problem(name: object, what: str = "identifier") -> str | None:
    """Why ``name`` cannot name a point, member or enum value (not a non-empty, storable string), or None."""
    if not isinstance(name, str) or not name:
        return f"{what} must be a non-empty string"
    problem = text_problem(name)
    return f"{what} {problem.removeprefix('string ')}" if problem else None


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
