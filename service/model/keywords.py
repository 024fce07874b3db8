"""The JSON Schema keywords our rules need, and ``PointValidator``, the validator class that knows them.

JSON Schema cannot express a few of our rules: ``noNul`` and ``wellFormedUnicode`` (PostgreSQL refuses
U+0000 and lone surrogates), ``maxBytes`` (STRING limits count UTF-8 bytes, not characters), ``finite`` and
``calendarDate`` (DATE). ``integer`` is redefined so that ``1.0`` is not an INT.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable, Iterator
from typing import Any, Final

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.protocols import Validator

from service.model.storable import nul_problem, surrogate_problem
from service.protocol.replies import quote

_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?: ([0-9]{2}):([0-9]{2}):([0-9]{2}))?")


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


def is_strict_int(_checker: object, instance: object) -> bool:
    """The ``integer`` type: an int that is not a bool (and, unlike Draft 2020-12, never ``1.0``)."""
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
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", is_strict_int),
)
"""Draft 2020-12 plus our keywords; every point schema is checked with this class."""
