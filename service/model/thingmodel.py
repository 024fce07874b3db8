"""Thing models: load each product's model from ``schemas/`` and check measure points and events against it.

A model file is JSON shaped like EnOS's model definition (design.md, "Thing models"). Each measure
point compiles once, at load, to a JSON Schema (``service.model.compiler``) and to a plain-Python
test derived from that schema; a good point costs one call of the test, and only a point the test
refuses goes to jsonschema, which has the last word and words the reason. A malformed model is a
``ModelError`` naming the file and what is wrong with it.

Events (``events``: identifier -> ``{"eventType", "outputData": [...]}``, EnOS's shape) are checked the same
way: each output parameter is compiled like a measure point without quality, and `ThingModel.check_event`
words every failing parameter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from jsonschema.protocols import Validator

from service.errors import ModelError
from service.model.compiler import IGNORED_KEYS, compile_event, compile_point, unknown_keys
from service.model.fasttest import fast_test
from service.model.keywords import PointValidator
from service.model.storable import name_problem, tree_problem
from service.model.wording import explain
from service.protocol.replies import quote

_MODEL_KEYS = ("productKey", "validate", "measurepoints", "events", "$schema")


@dataclass(frozen=True, slots=True)
class PointIssue:
    """A measure point that failed its model, and why, in words for the device."""

    identifier: str
    reason: str

    def __str__(self) -> str:
        return f"{self.identifier}: {self.reason}"


@dataclass(frozen=True, slots=True)
class CheckedPoint:
    """A measure point that passed: the value as sent (quality unwrapped) and its quality, if the point has one."""

    identifier: str
    value: object
    quality: int | None


@dataclass(frozen=True, slots=True)
class PointSpec:
    """One measure point of a model: its compiled schema, the jsonschema validator and the fast test built from it."""

    identifier: str
    data_type: str
    has_quality: bool
    schema: dict[str, Any]
    validator: Validator = field(repr=False, compare=False)
    fast_test: Callable[[object], bool] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One event of a model: its type (INFO, WARN, ERROR) and its output parameters, each compiled like a point."""

    identifier: str
    event_type: str
    params: Mapping[str, PointSpec]
    required: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ThingModel:
    """One product's thing model: what its devices may report."""

    product_key: str
    validate: bool
    path: str
    points: Mapping[str, PointSpec]
    events: Mapping[str, EventSpec] = field(default_factory=lambda: MappingProxyType({}))

    def check_event(self, identifier: str, values: Mapping[str, object]) -> list[PointIssue]:
        """Every problem with an event ``identifier`` reporting output ``values`` (empty: it may be stored).

        An event the model does not define is one issue when ``validate`` is true; otherwise it is stored as
        sent, provided its names and values can be stored. Of a defined event, an output parameter the
        model does not define is an issue when ``validate`` is true, and a ``required`` one missing always is.
        """
        spec = self.events.get(identifier)
        if spec is None:
            if self.validate:
                return [PointIssue(_printable(identifier), f"event not defined in the model of {self.product_key}")]
            return [
                PointIssue(_printable(name), problem)
                for name, value in values.items()
                if (problem := name_problem(name) or tree_problem(value))
            ]
        issues: list[PointIssue] = []
        for name, value in values.items():
            param = spec.params.get(name)
            if param is not None:
                if not param.fast_test(value) and (reason := explain(param.validator, False, value)):
                    issues.append(PointIssue(name, reason))
            elif self.validate:
                issues.append(PointIssue(_printable(name), f"not an output parameter of event {identifier}"))
            elif problem := name_problem(name) or tree_problem(value):
                issues.append(PointIssue(_printable(name), problem))
        issues.extend(
            PointIssue(name, "required output parameter missing") for name in spec.required if name not in values
        )
        return issues

    def check(self, measurepoints: Mapping[str, object]) -> tuple[list[CheckedPoint], list[PointIssue]]:
        """Check every point; return the good ones and an issue for every bad one (never stop at the first).

        An identifier the model does not define is an issue when ``validate`` is true; otherwise its
        value is accepted as it is (no quality), provided its identifier and every string in it can be stored.
        """
        good: list[CheckedPoint] = []
        bad: list[PointIssue] = []
        for identifier, value in measurepoints.items():
            spec = self.points.get(identifier)
            if spec is not None:
                # fast_test may refuse what jsonschema accepts (exotic Python types), never the reverse,
                # so jsonschema has the last word on a refusal and words the reason.
                if not spec.fast_test(value) and (reason := explain(spec.validator, spec.has_quality, value)):
                    bad.append(PointIssue(identifier, reason))
                elif spec.has_quality:
                    wrapped = cast("dict[str, Any]", value)
                    good.append(CheckedPoint(identifier, wrapped["value"], wrapped["quality"]))
                else:
                    good.append(CheckedPoint(identifier, value, None))
            elif self.validate:
                bad.append(PointIssue(_printable(identifier), "not defined in the model"))
            elif problem := name_problem(identifier) or tree_problem(value):
                bad.append(PointIssue(_printable(identifier), problem))
            else:
                good.append(CheckedPoint(identifier, value, None))
        return good, bad


def _printable(identifier: object) -> str:
    # An identifier we refuse may itself hold NUL or a lone surrogate; echo it escaped, never raw.
    return quote(identifier) if name_problem(identifier) else cast(str, identifier)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; in a model that hides a mistake.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {quote(key)}")
        result[key] = value
    return result


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _read(path: Path) -> object:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(str(path), f"cannot read the file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ModelError(str(path), f"not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ModelError(str(path), f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # raised by our hooks
        raise ModelError(str(path), f"invalid JSON: {exc}") from None


def load_model(path: Path) -> ThingModel:
    """Read and compile one model file; raises ModelError naming the file and the (first) reason."""
    model, problems = _load(path)
    if problems:
        raise problems[0]
    assert model is not None
    return model


def model_problems(path: Path) -> list[ModelError]:
    """Every problem of one model file: each bad measure point, not only the first."""
    return _load(path)[1]


def _load(path: Path) -> tuple[ThingModel | None, list[ModelError]]:
    try:
        return compile_model(_read(path), str(path)), []
    except _Problems as found:
        return None, found.problems
    except ModelError as error:
        return None, [error]


class _Problems(ModelError):
    """Every bad measure point of one model, raised once they have all been looked at (reads as the first)."""

    def __init__(self, problems: list[ModelError]) -> None:
        super().__init__(problems[0].path, problems[0].reason)
        self.problems = problems


def compile_model(document: object, where: str = "<model>") -> ThingModel:
    """Compile a parsed model document (no I/O); raises ModelError naming ``where`` and the reason."""
    if not isinstance(document, dict):
        raise ModelError(where, "a thing model must be a JSON object")
    unknown = sorted(set(document) - set(_MODEL_KEYS) - IGNORED_KEYS)
    if unknown:
        raise ModelError(where, unknown_keys(unknown, _MODEL_KEYS))
    product_key = document.get("productKey")
    if problem := name_problem(product_key, "productKey"):
        raise ModelError(where, problem)
    if any(char in cast(str, product_key) for char in "/+#"):
        raise ModelError(where, "productKey cannot contain '/', '+' or '#' (it is a topic level)")
    validate = document.get("validate", True)
    if not isinstance(validate, bool):
        raise ModelError(where, "validate must be true or false")
    measurepoints = document.get("measurepoints")
    if not isinstance(measurepoints, dict):
        raise ModelError(where, "measurepoints must be an object of identifier -> definition")
    points: dict[str, PointSpec] = {}
    problems: list[ModelError] = []
    for identifier, definition in measurepoints.items():
        try:
            data_type, has_quality, schema = compile_point(where, identifier, definition)
        except ModelError as error:
            problems.append(error)  # go on: `model check` names every bad point at once
            continue
        validator = PointValidator(schema)
        points[identifier] = PointSpec(identifier, data_type, has_quality, schema, validator, fast_test(schema))
    if problems:
        raise _Problems(problems)
    return ThingModel(cast(str, product_key), validate, where, MappingProxyType(points), _events(document, where))


def _events(document: dict[str, Any], where: str) -> Mapping[str, EventSpec]:
    definitions = document.get("events", {})
    if not isinstance(definitions, dict):
        raise ModelError(where, "events must be an object of identifier -> definition")
    events: dict[str, EventSpec] = {}
    for identifier, definition in definitions.items():
        event_type, compiled = compile_event(where, identifier, definition)
        params = {
            name: PointSpec(name, data_type, False, schema, PointValidator(schema), fast_test(schema))
            for name, data_type, _, schema in compiled
        }
        required = tuple(name for name, _, needed, _ in compiled if needed)
        events[identifier] = EventSpec(identifier, event_type, MappingProxyType(params), required)
    return MappingProxyType(events)


def _model_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ModelError(str(directory), "not a directory" if directory.exists() else "no such directory")
    files = sorted(directory.glob("*.json"))
    if not files:
        raise ModelError(str(directory), "no thing model files (*.json) in this directory")
    return files


def _add(models: dict[str, ThingModel], model: ThingModel) -> None:
    first = models.setdefault(model.product_key, model)
    if first is not model:
        raise ModelError(model.path, f"productKey {quote(model.product_key)} is already defined by {first.path}")


def load_models(directory: Path) -> dict[str, ThingModel]:
    """Load every ``*.json`` in ``directory`` (sorted), keyed by productKey; raises ModelError on the first problem.

    A missing or empty directory is an error too: a broker with no models would refuse every message.
    """
    models: dict[str, ThingModel] = {}
    for path in _model_files(directory):
        _add(models, load_model(path))
    return models


def check_paths(paths: Sequence[Path]) -> list[ModelError]:
    """Every problem in the given model files and directories (``pointgate model check``), not just the first.

    A productKey defined twice across everything checked is a problem, as it would be in one directory.
    """
    errors: list[ModelError] = []
    files: list[Path] = []
    for path in paths:
        if not path.exists():
            errors.append(ModelError(str(path), "no such file or directory"))
            continue
        try:
            files.extend(_model_files(path) if path.is_dir() else [path])
        except ModelError as error:
            errors.append(error)
    models: dict[str, ThingModel] = {}
    seen: set[Path] = set()
    for path in files:
        if path.resolve() in seen:  # a file named both alone and through its directory
            continue
        seen.add(path.resolve())
        model, problems = _load(path)
        errors.extend(problems)
        if model is not None:
            try:
                _add(models, model)
            except ModelError as error:
                errors.append(error)
    return errors
