"""The config reference, from the config classes themselves: every field's dotted key, type, default and docstring.

    raygpt config schema [SECTION]          # on the console
    python -m cluster.schema > docs/config.md   # the reference in docs/ (a test checks it is up to date)

Also the "did you mean" of an unknown key (`closest_key`).
"""

from __future__ import annotations

import difflib
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from cluster.config import RunConfig
from core.config import Section


@dataclass(frozen=True)
class Field:
    key: str
    """Dotted key as written in a recipe or an override (`data.sources[].path` for fields of list items)."""
    type: str
    default: str
    doc: str


def _sections(annotation: Any) -> list[type[Section]]:
    """The Section classes an annotation holds directly or as list items (`list[SourceConfig]`)."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return [annotation]
    if get_origin(annotation) in (list, tuple) or get_origin(annotation) in (Union, types.UnionType):
        return [s for arg in get_args(annotation) for s in _sections(arg)]
    return []


def type_name(annotation: Any) -> str:
    """A readable type: `int`, `'fp32' | 'bf16'`, `list[str]`, `int | None`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: Any) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return "(section)"
    return json.dumps(value, default=str)


def fields(model: type[Section] = RunConfig, prefix: str = "") -> Iterator[Field]:
    """Every field of `model`, depth first; a section's own line comes before its fields."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _sections(info.annotation)
        yield Field(key, type_name(info.annotation), _default(info), " ".join((info.description or "").split()))
        for section in nested:
            is_list = get_origin(info.annotation) in (list, tuple)
            yield from fields(section, f"{key}[]." if is_list else f"{key}.")


def closest_key(loc: tuple[str | int, ...]) -> str | None:
    """The valid dotted key nearest to an unknown one (`data.seq_lenn` → `data.seq_len`), or None."""
    wanted = ".".join("[]" if isinstance(p, int) else str(p) for p in loc).replace(".[]", "[]")
    keys = [f.key for f in fields()]
    siblings = [k for k in keys if k.rsplit(".", 1)[0] == wanted.rsplit(".", 1)[0]] or keys
    match = difflib.get_close_matches(wanted, siblings, n=1, cutoff=0.6)
    return match[0] if match else None


def text(section: str | None = None) -> str:
    """The console reference of one section (or of everything): key, type, default, then the docstring."""
    chosen = [f for f in fields() if section is None or f.key == section or f.key.startswith(f"{section}.")
              or f.key.startswith(f"{section}[]")]
    if not chosen:
        sections = ", ".join(f.key for f in fields() if f.default == "(section)" or f.key == "data")
        raise KeyError(f"no config section or key {section!r} (sections: {sections})")
    return "\n".join(f"{f.key}: {f.type} = {f.default}\n    {f.doc}" for f in chosen) + "\n"


def markdown() -> str:
    """docs/config.md: one table per top-level section."""
    out = ["# Config reference", "",
           "Every key of a raygpt recipe (`configs/*.yaml`), with its type, default and meaning. Generated from the "
           "config classes by `python -m cluster.schema > docs/config.md`; `raygpt config schema [SECTION]` prints the "
           "same on the console and `raygpt config show CONFIG` the resolved recipe. Values may use `${VAR}` and "
           "`${VAR:-default}` (written back as such in RUN_DIR/config.yaml); any key can be overridden on the command "
           "line as `section.key=value`.", ""]
    top = [f for f in fields() if "." not in f.key and "[" not in f.key]
    out += ["## Top level", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    out += [_row(f) for f in top if f.default != "(section)" and f.key != "data"]
    for section in [f for f in top if f.default == "(section)" or f.key == "data"]:
        out += ["", f"## `{section.key}`", "", section.doc, "", "| key | type | default | meaning |",
                "| --- | --- | --- | --- |"]
        out += [_row(f) for f in fields() if f.key.startswith(f"{section.key}.") or f.key.startswith(f"{section.key}[]")]
    return "\n".join(out) + "\n"


def _row(f: Field) -> str:
    cells = [f"`{f.key}`", f"`{f.type}`".replace("|", "\\|"), f"`{f.default}`", f.doc.replace("|", "\\|")]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.stdout.write(markdown())
