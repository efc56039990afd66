"""The base of every config section: unknown keys refused, values of the wrong kind refused rather than coerced,
and typed partial copies of a section (a stage's overrides)."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, create_model, field_validator


def _scalar_kinds(annotation: Any) -> set[type]:
    """The plain types a field annotation admits (through ``X | None``, ``Annotated`` and ``Literal``)."""
    if annotation in (int, float, bool, str):
        return {annotation}
    kinds: set[type] = set()
    if get_origin(annotation) is Literal:
        return {type(v) for v in get_args(annotation)}
    for arg in get_args(annotation):
        kinds |= _scalar_kinds(arg)
    return kinds


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _same_kind(cls, value: Any, info) -> Any:
        """pydantic's lax mode reads ``true`` as 1 for a number and ``1`` as true for a switch; in a config either is
        almost surely a slip (``batch_size: true``, ``trust_remote_code: 1``), so it is refused. Strings that spell a
        number stay accepted (YAML reads ``1e-3`` without a dot as a string)."""
        kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError(f"a number is expected here, not {str(value).lower()}")
        if kinds == {bool} and not isinstance(value, bool) and value is not None:
            raise ValueError("true or false is expected here")
        return value


def partial(model: type[BaseModel], name: str) -> type[BaseModel]:
    """A copy of ``model`` whose every field is optional and empty by default (nested models made partial too),
    with the same descriptions and constraints: the typed shape of a stage's overrides."""
    fields = {}
    for key, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            ann = partial(ann, f"{ann.__name__}Overrides")
        copy = info._copy()  # keeps description and constraints
        copy.default, copy.default_factory = None, None
        copy.annotation = ann | None
        fields[key] = (ann | None, copy)
    return create_model(name, __base__=StrictModel, __doc__=model.__doc__, **fields)
