"""Which config fields hold local paths, and making them absolute: launchers whose workers start
in another working directory (Ray) resolve every such field from the schema, never from a list."""
from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Union, get_args, get_origin

from pydantic import BaseModel


class _PathMarker:
    """Marks a field that may hold a local path (a file or directory the run reads): launchers
    whose workers start elsewhere (Ray) make these absolute from the schema, not from a list."""

    def __init__(self, always: bool = False):
        self.always = always  # output_dir: absolute even before it exists


LocalPath = Annotated[str, _PathMarker()]
OutputPath = Annotated[str, _PathMarker(always=True)]


def _marker(field) -> _PathMarker | None:
    """The path marker of a pydantic field, looking through ``X | None`` and ``X | list[...]``."""
    for meta in field.metadata:
        if isinstance(meta, _PathMarker):
            return meta
    pending = [field.annotation]
    while pending:
        tp = pending.pop()
        if get_origin(tp) is Annotated:
            found = next((m for m in get_args(tp)[1:] if isinstance(m, _PathMarker)), None)
            if found:
                return found
        elif get_origin(tp) in (Union, UnionType):
            pending.extend(get_args(tp))
    return None


def _absolute_path(value: str, base: Path, always: bool) -> str:
    if value.startswith(("package:", "pipe:")) or "://" in value or Path(value).is_absolute():
        return value
    local = base / value
    # a brace pattern of shards exists through its directory
    probe = local.parent if "{" in local.name else local
    return str(local.resolve()) if always or probe.exists() else value


def absolute_paths(model: BaseModel, base: Path):
    updates = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        marker = _marker(field)
        if isinstance(value, str) and marker is not None:
            updates[name] = _absolute_path(value, base, marker.always)
        elif isinstance(value, BaseModel):
            updates[name] = absolute_paths(value, base)
        elif isinstance(value, list):
            updates[name] = [absolute_paths(v, base) if isinstance(v, BaseModel) else v for v in value]
    return model.model_copy(update=updates)


