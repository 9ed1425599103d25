"""Typed config sections on pydantic, with errors that name the full key, the value and what is valid.

Every section of the student's configs (``student.config``, ``student.model.config``) derives
from ``ConfigSection``:

- unknown keys are refused, and the error lists the known ones;
- values are strict (the string ``"yes"`` is not a bool, ``2.5`` is not an int, ``5`` is not a
  list), except numbers: a ``Number`` field takes an int, and any text ``float()`` reads, because
  PyYAML reads ``2e-4`` (no dot) as a string;
- a validation error becomes the package's own exception (``ConfigError``, ``ModelError``) with
  one line per problem, ``optim.lr: got -1, expected > 0``, keys joined from the outermost
  section down, so that the same check reads ``backbone.depth`` in a model config and
  ``model.backbone.depth`` in a training config.

A section's own checks raise ``Invalid`` (from a field validator: about that field; from a model
validator: naming the ``field`` it is about, relative to the section).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from typing_extensions import Self


class Invalid(ValueError):
    """A value a section's own check refuses: ``message`` says why, ``field`` which key (relative)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _number(value: Any) -> Any:
    # YAML and the command line write numbers as text ("2e-4") and whole floats as ints ("lr: 1").
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


#: A float field that also takes an int or a numeric string (stored as a float).
Number = Annotated[float, BeforeValidator(_number)]

# True while a section validates: pydantic calls the __init__ of nested sections too, and only
# the outermost one turns the collected errors into the package's exception.
_VALIDATING: ContextVar[bool] = ContextVar("validating", default=False)

# What a type error expects, by pydantic's error type.
_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
}
# Bound constraints (``Field(gt=0)``...): the comparison and the key of the bound in the context.
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_MAPPING_ERRORS = ("model_type", "model_attributes_type", "dict_type")


class ConfigSection(BaseModel):
    """A config section: strict, closed, raising ``error_type`` with every problem named by its key.

    ``section``: the key of this section in its parent (``"optim"``), so that a section built on
    its own (``OptimConfig(lr=-1)``) names ``optim.lr`` as it would inside the whole config.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    error_type: ClassVar[type[Exception]] = ValueError
    section: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:
        if _VALIDATING.get():  # a nested section: its errors go up with their location
            super().__init__(**data)
            return
        token = _VALIDATING.set(True)
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise self.error_type(describe(error, type(self))) from None
        finally:
            _VALIDATING.reset(token)

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Validate a nested dict (e.g. ``to_dict()``'s): missing keys take their defaults."""
        if not isinstance(data, Mapping):
            where = cls.section or "config"
            raise cls.error_type(f"{where}: expected a mapping, got {type(data).__name__} ({data!r})")
        # Through __init__ (not model_validate, which would wrap our exception in pydantic's).
        return cls(**{str(key): value for key, value in data.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of lists, numbers, strings and None (YAML/JSON/``torch.save``-able)."""
        return self.model_dump()


def describe(error: ValidationError, root: type[ConfigSection]) -> str:
    """One line per problem of ``error`` (validating ``root``), unknown keys first, joined by ``; ``."""
    prefix: tuple[str | int, ...] = tuple(root.section.split(".")) if root.section else ()
    unknown: dict[tuple[str | int, ...], list[str | int]] = {}
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        if item["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(loc[-1])
        else:
            lines.append(_describe_one(item, prefix + loc))
    for where, keys in reversed(unknown.items()):
        known = sorted(_section_at(root, where).model_fields)
        names = ", ".join(join_key((*prefix, *where, key)) for key in keys)
        section = join_key(prefix + where)
        lines.insert(0, f"unknown key(s) {names}; known keys{' of ' + section if section else ''}: {known}")
    return "; ".join(lines)


def join_key(loc: tuple[str | int, ...]) -> str:
    """``("schedule", "lr_drop", 0)`` -> ``schedule.lr_drop[0]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe_one(item: Any, loc: tuple[str | int, ...]) -> str:
    kind, value, context = item["type"], item.get("input"), item.get("ctx") or {}
    if kind == "value_error" and isinstance(context.get("error"), Invalid):
        invalid = context["error"]
        loc, text = (*loc, invalid.field) if invalid.field else loc, invalid.message
    elif kind in _EXPECTED:
        text = f"got {value!r}, expected {_EXPECTED[kind]}"
    elif kind in _BOUNDS:
        bound = next(iter(context.values()))
        text = f"got {value!r}, expected {_BOUNDS[kind]} {bound}"
    elif kind == "literal_error":
        text = f"got {value!r}, expected {context['expected']}"
    elif kind == "too_short":
        count = context["min_length"]
        text = f"got {value!r}, expected at least {count} item{'' if count == 1 else 's'}"
    elif kind in _MAPPING_ERRORS:
        text = f"expected a mapping, got {type(value).__name__} ({value!r})"
    else:  # a check without a message of ours: pydantic's own words
        text = f"got {value!r}: {item['msg']}"
    return f"{join_key(loc) or 'config'}: {text}"


def _section_at(root: type[ConfigSection], where: tuple[str | int, ...]) -> type[BaseModel]:
    """The section class at key path ``where`` below ``root`` (whose unknown keys are listed)."""
    section: type[BaseModel] = root
    for part in where:
        annotation = section.model_fields[str(part)].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), (where, annotation)
        section = annotation
    return section
