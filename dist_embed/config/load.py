"""Loading a config: a YAML file plus ``key.sub=value`` overrides, validated into ``Config``; an
error names the file and line, or the command line, where the bad value was given."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .schema import Config


class ConfigError(ValueError):
    """A configuration problem; the CLI prints it as one line and exits with code 2."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training.lr=1e-4`` -> (["training", "lr"], "1e-4"); values are parsed as YAML, except that
    a number stays the text it was written as: the typed config turns it into a number where the
    key is numeric and keeps it as written where the key is text (``model.revision=2.0``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: invalid YAML value: {getattr(e, 'problem', e)}") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = raw.strip()
    return key.split("."), value


def _set_path(tree: dict, path: list[str], value: Any, origin: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = prefix + (str(k.value),)
                lines[path] = k.start_mark.line + 1
                walk(v, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[prefix + (i,)] = v.start_mark.line + 1
                walk(v, prefix + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read ``path`` (YAML), apply ``overrides`` and validate. Raises ConfigError with file/line/key."""
    tree: dict = copy.deepcopy(base) if base else {}
    lines: dict[tuple, int] = {}
    origin = "config"
    if path is not None:
        path = Path(path)
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree.update(loaded)
        lines = _key_lines(text)
    overridden: set[tuple] = set()
    for item in overrides:
        keys, value = parse_override(item)
        _set_path(tree, keys, value, f"override {item!r}")
        overridden.add(tuple(keys))
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e, origin, lines, overridden)) from None


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[A-Za-z]+\[.*\])$")


def _union_errors(errors: list[dict]) -> list[dict]:
    """pydantic reports a ``str | list[...]`` field's errors for every branch, each under a tag in
    the location (``data.train.str``, ``data.train.list[DatasetConfig].0.name``). Keep the errors
    of the branch the value matched (those deeper than a plain type mismatch), without the tag."""
    def tag_at(loc):
        return next((i for i, p in enumerate(loc) if isinstance(p, str) and _UNION_TAG.match(p)), None)

    deep = {tuple(e["loc"][:i]) for e in errors if (i := tag_at(e["loc"])) is not None and len(e["loc"]) > i + 1}
    out = []
    for e in errors:
        i = tag_at(e["loc"])
        if i is None:
            out.append(e)
        elif len(e["loc"]) > i + 1 or tuple(e["loc"][:i]) not in deep:
            out.append({**e, "loc": tuple(e["loc"][:i]) + tuple(e["loc"][i + 1:])})
    return out


def _describe(err: ValidationError, origin: str, lines: dict, overridden: set) -> str:
    msgs = []
    for item in _union_errors(err.errors()):
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            what = "unknown key"
        elif item["type"] == "missing":
            what = "missing required key"
        else:
            what = f"{item['msg']} (got {item.get('input')!r})"
        if any(loc[:len(o)] == o or o[:len(loc)] == loc for o in overridden) and loc not in lines:
            where = "command line"
        elif loc in overridden:
            where = "command line"
        elif loc in lines:
            where = f"{origin}:{lines[loc]}"
        else:
            where = origin
        msgs.append(f"{where}: {key}: {what}")
    return "; ".join(msgs)


def dump_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
