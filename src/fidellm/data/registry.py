"""The source registry: sources.yaml (packaged) plus an optional user YAML, validated into `SourceSpec`s.

A source is a few lines of YAML: where its files are, their format, which fields hold the text/id/date, its
licence, and where its exact upstream copy lives. Every validation error names the YAML file, the entry and
the field.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from fidellm.data.markup import MARKUPS
from fidellm.data.readers import (
    FORMAT_OPTIONS,
    SQUAD_PARTS,
    SUPPORTED_FORMATS,
    TXT_UNITS,
    supported_formats_message,
)
from fidellm.errors import FidelError

SECTIONS = ("pretrain", "eval", "parallel", "sft")
LICENCE_FAMILIES = ("open", "noncommercial", "unknown")
ID_RULES = ("field", "line", "index")
RAW_GITHUB = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"


@dataclass(frozen=True)
class PathEntry:
    """One path pattern of a source (relative to the data dir or absolute; glob allowed) and its split."""

    pattern: str
    split: str | None = None


@dataclass(frozen=True)
class DownloadFile:
    """A file as it lies in the data dir (without .zst), the sha256 of its uncompressed content, and where the
    exact copy can be fetched (an explicit url, or the upstream path inside the source's repo@commit)."""

    path: str
    sha256: str
    upstream: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class SourceSpec:
    """One registry entry. See sources.yaml for the meaning of each field."""

    name: str
    section: str
    paths: tuple[PathEntry, ...]
    format: str
    license: str
    license_family: str
    text_fields: tuple[str, ...] = ("text",)
    id_field: str | None = None
    id_rule: str = "index"
    date_field: str | None = None
    group_by: tuple[str, ...] = ()
    unit: str = "line"
    markup: str = "none"
    """Markup stripped from the text at read time (`fidellm.data.markup`): none | wikitext."""
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    license_field: str | None = None
    license_values: Mapping[str, str] = field(default_factory=dict, hash=False)
    removed_ids: str | None = None
    weight: float = 1.0
    default: bool = True
    description: str = ""
    upstream_repo: str | None = None
    upstream_commit: str | None = None
    upstream_paths: tuple[str, ...] = ()
    converted: bool = False
    files: tuple[DownloadFile, ...] = ()
    allowed_families: tuple[str, ...] | None = None
    origin: str = ""
    root: str | None = None

    def url_for(self, item: DownloadFile) -> str | None:
        """The canonical URL of one exact-copy file, or None when it has none."""
        if item.url:
            return item.url
        if item.upstream and self.upstream_repo and self.upstream_commit:
            return RAW_GITHUB.format(
                repo=self.upstream_repo, commit=self.upstream_commit, path=quote(item.upstream)
            )
        return None


@dataclass(frozen=True)
class EvalUnit:
    """One evaluation unit (a sentence, article, context, question…): `unit_id` is `set/split:key`."""

    set_name: str
    unit_id: str
    text: str


def licence_family_of(licence: str) -> str:
    """open | noncommercial | unknown, from a licence string (used for per-document licences)."""
    text = re.sub(r"[-_]", " ", licence.upper())
    if re.search(r"\bNC\b|NONCOMMERCIAL|NON COMMERCIAL|RESEARCH PURPOSES", text):
        return "noncommercial"
    if re.search(r"\bCC0\b|\bCC BY\b|\bMIT\b|\bAPACHE\b|\bBSD\b|PUBLIC DOMAIN", text):
        return "open"
    return "unknown"


# ---------------------------------------------------------------------------------------------- loading

_KEYS = {
    "name", "section", "paths", "format", "text_fields", "id_field", "id_rule", "date_field", "group_by",
    "unit", "options", "license", "license_family", "license_field", "license_values", "removed_ids",
    "weight", "default", "description", "upstream", "converted", "files", "markup",
}  # fmt: skip


def _count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _names(value: Any, allowed: tuple[str, ...] | None = None) -> bool:
    """A non-empty list of distinct non-empty strings (from `allowed` when given)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, str) and v and (allowed is None or v in allowed) for v in value)
        and len(set(value)) == len(value)
    )


_OPTION_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "delimiter": (
        lambda v: isinstance(v, str) and len(v) == 1 and v not in '"\r\n',
        "one character (not a quote or a line break)",
    ),
    "header": (lambda v: isinstance(v, bool), "true or false"),
    "columns": (_names, "a list of distinct column names"),
    "quoting": (lambda v: v in ("minimal", "none"), "minimal or none"),
    "batch_size": (lambda v: _count(v, 1), "an integer >= 1"),
    "records": (lambda v: isinstance(v, str) and bool(v), "a dotted path such as data.items"),
    "record_tag": (lambda v: isinstance(v, str) and bool(v), "an element name"),
    "column": (lambda v: _count(v, 0), "an integer >= 0"),
    "parts": (lambda v: _names(v, SQUAD_PARTS), f"a list of {', '.join(SQUAD_PARTS)}"),
}
"""What each format option must be: checked when the registry loads, not inside a worker much later."""


class _Entry:
    """Validation helper for one YAML entry: every error names the file, the entry and the field."""

    def __init__(self, raw: Any, origin: str, index: int):
        self.origin, self.index = origin, index
        self.name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(raw, dict):
            self.fail("(entry)", "must be a mapping of fields")
        self.raw = raw

    def fail(self, key: str, problem: str) -> None:
        who = f"source {self.name!r} (entry {self.index})" if self.name else f"entry {self.index}"
        raise FidelError(f"{self.origin}: {who}, field {key!r}: {problem}")

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False
    ) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if required:
                self.fail(key, "is required")
            return default
        value = self.raw[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(key, f"must be {names}, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.get(key, str, default, required=default is None)
        if value not in choices:
            self.fail(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, (str, list), list(default))
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(v, str) and v for v in items):
            self.fail(key, "must be a string or a list of non-empty strings")
        return tuple(items)


def _parse_entry(raw: Any, origin: str, index: int, root: str | None) -> SourceSpec:
    entry = _Entry(raw, origin, index)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        entry.fail(unknown[0], f"unknown field; known fields: {', '.join(sorted(_KEYS))}")
    name = entry.get("name", str, required=True)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        entry.fail("name", "use letters, digits, '_', '-' and '.' only")
    fmt = entry.get("format", str, required=True)
    if fmt not in SUPPORTED_FORMATS:
        entry.fail("format", f"{fmt!r} is not supported; {supported_formats_message()}")
    paths_raw = entry.get("paths", (str, list, dict), required=True)
    if isinstance(paths_raw, dict):
        paths = tuple(PathEntry(str(p), str(s)) for s, p in paths_raw.items())
    else:
        paths = tuple(PathEntry(p) for p in ([paths_raw] if isinstance(paths_raw, str) else paths_raw))
    if not paths or not all(isinstance(p.pattern, str) and p.pattern for p in paths):
        entry.fail("paths", "must list at least one non-empty path")
    options = entry.get("options", dict, {})
    bad = sorted(set(options) - FORMAT_OPTIONS[fmt])
    if bad:
        allowed = ", ".join(sorted(FORMAT_OPTIONS[fmt])) or "none"
        entry.fail("options", f"option {bad[0]!r} does not apply to {fmt}; options for {fmt}: {allowed}")
    if fmt == "xml" and "record_tag" not in options:
        entry.fail("options", "xml sources need record_tag (the element holding one record)")
    for key, value in options.items():
        valid, wanted = _OPTION_VALUES[key]
        if not valid(value):
            entry.fail(f"options.{key}", f"must be {wanted}, got {value!r}")
    if options.get("header") is False and "columns" not in options:
        entry.fail("options.columns", "is required with header: false (the names of the columns)")
    if options.get("header", True) and "columns" in options:
        entry.fail("options.columns", "applies only with header: false (the file's header names them)")
    id_field = entry.get("id_field", str)
    upstream = entry.get("upstream", dict, {})
    if set(upstream) - {"repo", "commit", "paths"}:
        entry.fail("upstream", "takes repo, commit and paths")
    files = []
    for item in entry.get("files", list, []):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("path"), str)
            or set(item) - {"path", "sha256", "upstream", "url"}
        ):
            entry.fail("files", f"each file needs path and sha256 (optional upstream, url); got {item!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", str(item.get("sha256", ""))):
            entry.fail("files", f"{item['path']}: sha256 must be 64 lowercase hex digits")
        files.append(DownloadFile(item["path"], item["sha256"], item.get("upstream"), item.get("url")))
    weight = float(entry.get("weight", (int, float), 1.0))
    if weight < 0:
        entry.fail("weight", "must be >= 0")
    license_values = entry.get("license_values", dict, {})
    return SourceSpec(
        name=name,
        section=entry.choice("section", SECTIONS),
        paths=paths,
        format=fmt,
        license=entry.get("license", str, required=True),
        license_family=entry.choice("license_family", LICENCE_FAMILIES),
        text_fields=entry.strings("text_fields", ("text",)),
        id_field=id_field,
        id_rule=entry.choice("id_rule", ID_RULES, "field" if id_field else "index"),
        date_field=entry.get("date_field", str),
        group_by=entry.strings("group_by"),
        unit=entry.choice("unit", TXT_UNITS, "line"),
        markup=entry.choice("markup", MARKUPS, "none"),
        options=options,
        license_field=entry.get("license_field", str),
        license_values={str(k): str(v) for k, v in license_values.items()},
        removed_ids=entry.get("removed_ids", str),
        weight=weight,
        default=entry.get("default", bool, True),
        description=entry.get("description", str, ""),
        upstream_repo=upstream.get("repo"),
        upstream_commit=upstream.get("commit"),
        upstream_paths=tuple(upstream.get("paths") or ()),
        converted=entry.get("converted", bool, False),
        files=tuple(files),
        origin=origin,
        root=root,
    )


def _load_file(text: str, origin: str, root: str | None) -> list[SourceSpec]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise FidelError(f"{origin}: not valid YAML ({error})") from error
    entries = document.get("sources") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise FidelError(f"{origin}: expected a top-level 'sources:' list of entries")
    return [_parse_entry(raw, origin, index, root) for index, raw in enumerate(entries)]


def load_registry(extra: str | os.PathLike | None = None) -> dict[str, SourceSpec]:
    """The packaged registry, plus the sources of a user YAML file (same fields; a name may not repeat).

    Relative paths in a user file are looked up in the data dir first, then beside the YAML file.
    """
    packaged = resources.files("fidellm.data").joinpath("sources.yaml")
    specs = _load_file(packaged.read_text(encoding="utf-8"), "fidellm/data/sources.yaml", None)
    if extra is not None:
        user = Path(extra).expanduser()
        if user.is_dir():
            raise FidelError(
                f"sources file {user} is a directory, expected a YAML file with a 'sources:' list"
            )
        if not user.is_file():
            raise FidelError(f"sources file {user} does not exist")
        specs += _load_file(user.read_text(encoding="utf-8"), str(user), str(user.resolve().parent))
    registry: dict[str, SourceSpec] = {}
    for spec in specs:
        if spec.name in registry:
            raise FidelError(
                f"{spec.origin}: source {spec.name!r} is already defined in {registry[spec.name].origin}"
            )
        registry[spec.name] = spec
    return registry


def select_sources(
    registry: Mapping[str, SourceSpec],
    names: list[str] | None = None,
    licence_families: list[str] | None = None,
    exclude: list[str] | None = None,
    weights: Mapping[str, float] | None = None,
    section: str = "pretrain",
) -> list[SourceSpec]:
    """Config-driven selection: the named sources (default: every default-on source of `section`; a name
    given twice counts once, not as a second read of the source), minus `exclude`, restricted to
    `licence_families` (sources with per-document licences are kept and filtered per document), with weights
    overridden from `weights`."""
    for label, given in (("sources", names), ("exclude", exclude), ("weights", list(weights or {}))):
        unknown = [n for n in given or [] if n not in registry]
        if unknown:
            raise FidelError(f"unknown source in {label}: {', '.join(unknown)}; known: {', '.join(registry)}")
    bad = [f for f in licence_families or [] if f not in LICENCE_FAMILIES]
    if bad:
        raise FidelError(
            f"unknown licence family {', '.join(bad)}; choose from {', '.join(LICENCE_FAMILIES)}"
        )
    negative = [f"{n}={w}" for n, w in (weights or {}).items() if w < 0]
    if negative:
        raise FidelError(f"source weights must be >= 0, got {', '.join(negative)}")
    chosen = (
        [registry[n] for n in dict.fromkeys(names)]
        if names
        else [s for s in registry.values() if s.section == section]
    )
    chosen = [s for s in chosen if names or s.default]
    chosen = [s for s in chosen if s.name not in set(exclude or [])]
    if licence_families is not None:
        allowed = tuple(licence_families)
        chosen = [s for s in chosen if s.license_field or s.license_family in allowed]
        chosen = [dataclasses.replace(s, allowed_families=allowed) for s in chosen]
    return [dataclasses.replace(s, weight=float((weights or {}).get(s.name, s.weight))) for s in chosen]
