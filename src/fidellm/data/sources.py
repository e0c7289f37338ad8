"""The source registry (sources.yaml + optional user YAML) and the readers that turn a source into documents.

A source is a few lines of YAML: where its files are, their format, which fields hold the text/id/date, its
licence, and where its exact upstream copy lives. `iter_documents` streams a source as datatrove `Document`s
(or `Rejection`s, so counts always add up); `iter_eval_units` streams the evaluation sets as `EvalUnit`s.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from datatrove.data import Document

from fidellm.data.readers import (
    COMPRESSED_SUFFIXES,
    FORMAT_OPTIONS,
    SUPPORTED_FORMATS,
    TXT_UNITS,
    RawRecord,
    Rejection,
    get_path,
    logical_name,
    read_records,
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
    "weight", "default", "description", "upstream", "converted", "files",
}  # fmt: skip


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
    """Config-driven selection: the named sources (default: every default-on source of `section`), minus
    `exclude`, restricted to `licence_families` (sources with per-document licences are kept and filtered per
    document), with weights overridden from `weights`."""
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
    chosen = [registry[n] for n in names] if names else [s for s in registry.values() if s.section == section]
    chosen = [s for s in chosen if names or s.default]
    chosen = [s for s in chosen if s.name not in set(exclude or [])]
    if licence_families is not None:
        allowed = tuple(licence_families)
        chosen = [s for s in chosen if s.license_field or s.license_family in allowed]
        chosen = [dataclasses.replace(s, allowed_families=allowed) for s in chosen]
    return [dataclasses.replace(s, weight=float((weights or {}).get(s.name, s.weight))) for s in chosen]


# ---------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class ResolvedFile:
    """A file found for a source: the real path (maybe .zst/.gz), a short label for ids, and its split."""

    path: Path
    label: str
    split: str


def _find(pattern: Path) -> list[Path]:
    """Files matching `pattern` or `pattern`.zst/.gz, one per logical file (plain preferred, then .zst)."""
    best: dict[Path, tuple[int, Path]] = {}
    for rank, suffix in enumerate(("", *COMPRESSED_SUFFIXES)):
        for hit in glob.glob(str(pattern) + suffix, recursive=True):
            path = Path(hit)
            if path.is_file():
                logical = path.parent / logical_name(path) if suffix else path
                if logical not in best or rank < best[logical][0]:
                    best[logical] = (rank, path)
    return [best[k][1] for k in sorted(best)]


def _download_hint(spec: SourceSpec, data_dir: Path) -> str:
    if spec.converted:
        return "this source was converted; copy it from the shared data (see MANIFEST.md)"
    return f"run `fidellm data download --data-dir {data_dir} --sources {spec.name}`"


def locate(spec: SourceSpec, pattern: str, data_dir: Path) -> list[Path]:
    """The files of one path pattern: absolute, else under the data dir, else beside the user's YAML file."""
    bases = [Path(pattern)] if os.path.isabs(pattern) else [data_dir / pattern]
    if spec.root and not os.path.isabs(pattern):
        bases.append(Path(spec.root) / pattern)
    for base in bases:
        found = _find(base)
        if found:
            return found
    raise FidelError(
        f"source {spec.name!r}: {pattern} not found in {data_dir} (also tried .zst and .gz); "
        + _download_hint(spec, data_dir)
    )


def resolve_files(spec: SourceSpec, data_dir: Path) -> list[ResolvedFile]:
    """Every file of a source in registry order, labelled relative to their common directory."""
    found: list[tuple[Path, str | None]] = []
    for entry in spec.paths:
        for path in locate(spec, entry.pattern, Path(data_dir)):
            if all(path != seen for seen, _ in found):
                found.append((path, entry.split))
    common = os.path.commonpath([str(p.resolve().parent) for p, _ in found])
    files = []
    for path, split in found:
        label = os.path.relpath(str(path.resolve().parent / logical_name(path)), common)
        files.append(ResolvedFile(path, label, split or logical_name(path).split(".")[0]))
    return files


def source_files(spec: SourceSpec, data_dir: Path) -> list[Path]:
    """The files a source reads, as found in the data dir (for hashing them into a run's report)."""
    return [resolved.path for resolved in resolve_files(spec, Path(data_dir))]


def _load_removed(spec: SourceSpec, data_dir: Path) -> tuple[set[str], str]:
    if not spec.removed_ids:
        return set(), ""
    (path,) = locate(spec, spec.removed_ids, data_dir)[:1]
    ids: set[str] = set()
    for item in read_records(path, "tsv", spec.name, lambda: True, required=["id"]):
        if isinstance(item, Rejection):
            raise FidelError(f"removed-ids file: {item}")
        ids.add(item.fields["id"])
    return ids, str(path)


# ---------------------------------------------------------------------------------------------- documents


class _Shard:
    """Record k of a source belongs to rank k % world_size; call once per record, in order."""

    def __init__(self, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise FidelError(f"invalid shard: rank {rank} of world size {world_size}")
        self.rank, self.world_size, self.k = rank, world_size, -1

    def __call__(self) -> bool:
        self.k += 1
        return self.k % self.world_size == self.rank


def extract_text(fields: Mapping[str, Any], text_fields: tuple[str, ...]) -> str | tuple[str, str]:
    """The text of a record (several fields joined by newlines; a list of strings is joined too), or a
    (reason, detail) pair: missing_field, bad_field_type or empty."""
    parts = []
    for name in text_fields:
        try:
            value = get_path(fields, name)
        except KeyError:
            return "missing_field", f"text field {name!r} is missing"
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = "\n".join(value)
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            return "bad_field_type", f"text field {name!r} is {kind}, not a string"
        if value.strip():
            parts.append(value)
    if not parts:
        return "empty", f"text field {' + '.join(text_fields)} is empty"
    return "\n".join(parts)


def _optional(fields: Mapping[str, Any], name: str | None) -> str | None:
    if not name:
        return None
    try:
        value = get_path(fields, name)
    except KeyError:
        return None
    return None if value is None else str(value)


def _licence(spec: SourceSpec, fields: Mapping[str, Any]) -> tuple[str, str]:
    value = _optional(fields, spec.license_field)
    if value is None:
        return spec.license, spec.license_family
    licence = spec.license_values.get(value, value)
    return licence, licence_family_of(licence)


def _document(
    spec: SourceSpec, orig_id: str, text: str, fields: Mapping[str, Any], where: tuple[str, int | None]
) -> Document | Rejection:
    licence, family = _licence(spec, fields)
    if spec.allowed_families is not None and family not in spec.allowed_families:
        return Rejection(spec.name, *where, "licence_excluded", f"{orig_id}: licence {licence!r} is {family}")
    metadata = {
        "source": spec.name,
        "orig_id": orig_id,
        "date": _optional(fields, spec.date_field),
        "license": licence,
        "license_family": family,
        "weight": spec.weight,
    }
    return Document(text=text, id=f"{spec.name}/{orig_id}", metadata=metadata)


def _record_id(spec: SourceSpec, record: RawRecord, label: str) -> str | None:
    if spec.id_rule == "field":
        value = _optional(record.fields, spec.id_field)
        return value if value else None
    return f"{label}:{record.line if spec.id_rule == 'line' else record.key}"


def _plain(spec: SourceSpec, files: list[ResolvedFile], removed: tuple[set[str], str], shard: _Shard):
    for resolved in files:
        records = read_records(
            resolved.path, spec.format, spec.name, shard, spec.options, spec.unit, _required(spec)
        )
        for record in records:
            if isinstance(record, Rejection):
                yield record
                continue
            where = (str(resolved.path), record.line)
            orig_id = _record_id(spec, record, resolved.label)
            if orig_id is None:
                yield Rejection(spec.name, *where, "missing_field", f"id field {spec.id_field!r} is missing")
            elif orig_id in removed[0]:
                yield Rejection(spec.name, *where, "removed_listed", f"{orig_id} is listed in {removed[1]}")
            else:
                text = extract_text(record.fields, spec.text_fields)
                if isinstance(text, tuple):
                    yield Rejection(spec.name, *where, text[0], text[1])
                else:
                    yield _document(spec, orig_id, text, record.fields, where)


def _grouped(spec: SourceSpec, files: list[ResolvedFile], removed: tuple[set[str], str], shard: _Shard):
    """Consecutive records with equal `group_by` values form one document (their texts as lines). Every rank
    parses every member; a group belongs to rank (group index % world_size), and member-level rejections are
    spread the same way, so sharded counts add up to the unsharded ones."""
    member_shard = _Shard(shard.rank, shard.world_size)
    seen: set[tuple[str, ...]] = set()
    key: tuple[str, ...] | None = None
    members: list[tuple[RawRecord, str]] = []

    def flush() -> Iterator[Document | Rejection]:
        if key is None or not shard():
            return
        orig_id = "/".join(key)
        first, first_path = members[0]
        where = (first_path, first.line)
        if orig_id in removed[0]:
            yield Rejection(spec.name, *where, "removed_listed", f"{orig_id} is listed in {removed[1]}")
            return
        lines = []
        for record, path in members:
            text = extract_text(record.fields, spec.text_fields)
            if isinstance(text, tuple):
                yield Rejection(
                    spec.name, path, record.line, text[0], f"{text[1]} (member of {orig_id}, skipped)"
                )
            else:
                lines.append(text)
        if lines:
            yield _document(spec, orig_id, "\n".join(lines), first.fields, where)
        else:
            yield Rejection(spec.name, *where, "empty", f"every member of group {orig_id} is empty")

    for resolved in files:
        for record in read_records(
            resolved.path, spec.format, spec.name, lambda: True, spec.options, spec.unit
        ):
            if isinstance(record, Rejection):
                if member_shard():
                    yield record
                continue
            try:
                record_key = tuple(str(get_path(record.fields, name)) for name in spec.group_by)
            except KeyError as error:
                if member_shard():
                    detail = f"group field {error.args[0]!r} is missing"
                    yield Rejection(spec.name, str(resolved.path), record.line, "missing_field", detail)
                continue
            if record_key != key:
                yield from flush()
                if record_key in seen:
                    raise FidelError(
                        f"{resolved.path}:{record.line}: records of group {'/'.join(record_key)} are not "
                        f"contiguous (source {spec.name!r} groups by {', '.join(spec.group_by)})"
                    )
                seen.add(record_key)
                key, members = record_key, []
            members.append((record, str(resolved.path)))
    yield from flush()


def _required(spec: SourceSpec) -> list[str]:
    """Columns a csv/tsv/parquet file of this source must have (top-level names of the configured fields)."""
    names = [*spec.text_fields, spec.id_field if spec.id_rule == "field" else None, *spec.group_by]
    return [n.split(".")[0] for n in names if n]


def iter_documents(
    spec: SourceSpec, data_dir: Path, rank: int = 0, world_size: int = 1
) -> Iterator[Document | Rejection]:
    """Stream one source as Documents (id `source/orig_id`, metadata source, orig_id, date, license,
    license_family, weight) and Rejections. Rank r of `world_size` gets records r, r+w, r+2w, … and decodes
    only those. Ids listed in the source's removed-ids file come back as Rejection `removed_listed`."""
    shard = _Shard(rank, world_size)
    files = resolve_files(spec, Path(data_dir))
    removed = _load_removed(spec, Path(data_dir))
    if spec.group_by:
        yield from _grouped(spec, files, removed, shard)
    else:
        yield from _plain(spec, files, removed, shard)


def iter_eval_units(
    data_dir: Path, sets: list[str] | None = None, registry: Mapping[str, SourceSpec] | None = None
) -> Iterator[EvalUnit]:
    """Every unit of the evaluation sets (default: the default-on `eval` sources of the registry), with ids
    `set/split:key` (key = 0-based record index in the split, or `ctxK`/`qK`/`aK` for SQuAD). Empty units are
    skipped; any other bad record is an error, since evaluation data must be intact."""
    registry = registry if registry is not None else load_registry()
    if sets is None:
        chosen = [s for s in registry.values() if s.section == "eval" and s.default]
    else:
        unknown = [n for n in sets if n not in registry or registry[n].section != "eval"]
        if unknown:
            known = [s.name for s in registry.values() if s.section == "eval"]
            raise FidelError(f"unknown evaluation set {', '.join(unknown)}; known: {', '.join(known)}")
        chosen = [registry[n] for n in sets]
    for spec in chosen:
        for resolved in resolve_files(spec, Path(data_dir)):
            records = read_records(
                resolved.path, spec.format, spec.name, lambda: True, spec.options, spec.unit, _required(spec)
            )
            for record in records:
                if isinstance(record, Rejection):
                    raise FidelError(f"evaluation set {record}")
                text = extract_text(record.fields, spec.text_fields)
                if isinstance(text, tuple):
                    if text[0] == "empty":
                        continue
                    raise FidelError(f"evaluation set {spec.name}: {resolved.path}:{record.line}: {text[1]}")
                yield EvalUnit(spec.name, f"{spec.name}/{resolved.split}:{record.key}", text)
