"""Shared base for every recipe section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section: unknown keys are errors; field descriptions come from attribute docstrings."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        populate_by_name=False,
    )


class FieldError(ValueError):
    """A cross-field check that blames one field: the error is reported at that field's line."""

    def __init__(self, field: str | tuple[str, ...], message: str):
        super().__init__(message)
        self.field = (field,) if isinstance(field, str) else field


class FieldErrors(ValueError):
    """Several FieldErrors of one validator (pydantic stops a model at its first validator error), each
    reported at its own field's line."""

    def __init__(self, errors: list[FieldError]):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors
