"""Sources as documents: resolve a registry source's files and stream them as datatrove `Document`s.

`iter_documents` streams a source as `Document`s (or `Rejection`s, so counts always add up);
`iter_eval_units` streams the evaluation sets as `EvalUnit`s. The registry itself lives in registry.py.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from datatrove.data import Document

from fidellm.data.compressed import COMPRESSED_SUFFIXES, logical_name
from fidellm.data.readers import RawRecord, Rejection, get_path, read_records
from fidellm.data.registry import EvalUnit, SourceSpec, licence_family_of, load_registry
from fidellm.errors import FidelError

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
    """What to do about a missing file: download it, copy it, or fix the path of one's own entry."""
    if spec.root is not None:  # an entry of the user's registry file: nothing to download
        return f"check the entry's paths in {spec.origin} (relative: to the data dir, then to that file)"
    if spec.converted:
        return "this source was converted; copy it from the shared data (see MANIFEST.md)"
    if not spec.files:
        return "the registry lists no download for it; see the shared data's MANIFEST.md"
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
    directories = [
        hit for base in bases for hit in sorted(glob.glob(str(base), recursive=True)) if os.path.isdir(hit)
    ]
    if directories:
        raise FidelError(
            f"source {spec.name!r} ({spec.origin}): path {pattern!r} names a directory ({directories[0]}),"
            f" expected {spec.format} files: list the files, or a glob such as"
            f" '{pattern.rstrip('/')}/*.{spec.format}'"
        )
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
            resolved.path, spec.format, spec.name, shard, spec.options, spec.unit, *_columns(spec)
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
    """Consecutive records with equal `group_by` values form one document (their texts as lines, metadata
    `records` their number); a rejected member is a rejection of its own. Every rank parses every member;
    a group belongs to rank (group index % world_size), and member-level rejections are spread the same way,
    so sharded counts add up to the unsharded ones."""
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
            detail = f"{orig_id} ({len(members)} records) is listed in {removed[1]}"
            yield Rejection(spec.name, *where, "removed_listed", detail, len(members))
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
        if lines:  # a group whose members are all rejected is accounted for by their rejections
            document = _document(spec, orig_id, "\n".join(lines), first.fields, where)
            if isinstance(document, Rejection):
                yield replace(document, records=len(lines))
            else:
                document.metadata["records"] = len(lines)
                yield document

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


def _columns(spec: SourceSpec) -> tuple[list[str], list[str]]:
    """The required columns, and the optional ones read where a file has them: the per-document licence
    and date (a record without them gets the source's licence and no date, as in every format)."""
    optional = [n.split(".")[0] for n in (spec.license_field, spec.date_field) if n]
    return _required(spec), optional


def iter_documents(
    spec: SourceSpec, data_dir: Path, rank: int = 0, world_size: int = 1
) -> Iterator[Document | Rejection]:
    """Stream one source as Documents (id `source/orig_id`, metadata source, orig_id, date, license,
    license_family, weight) and Rejections. Rank r of `world_size` gets records r, r+w, r+2w, … and decodes
    only those. Ids listed in the source's removed-ids file come back as Rejection `removed_listed`. A
    `group_by` document's metadata adds `records`, the source records it was made of."""
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
