"""Configuration of `fidellm data prepare`: every threshold in one YAML-loadable dataclass.

Defaults are the values measured on the shared Amharic corpora (see benchmarks/RESULTS.md and the data
report); a YAML file given with `--config` overrides any subset of them.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from fidellm.errors import FidelError

RERUN_PREPARE = "a damaged intermediate file: re-run `fidellm data prepare RUN --overwrite`"


@dataclass
class SourceSelection:
    """Which registry sources to read and how much each counts."""

    include: list[str] | None = None  # None: every `pretrain` source of the registry
    exclude: list[str] = field(default_factory=list)
    licence_families: list[str] | None = None  # e.g. ["open"]; None keeps all
    weights: dict[str, float] = field(default_factory=dict)  # source -> sampling weight (tokenize stage)
    extra_registry: str | None = None  # a user YAML with more sources (same fields as the packaged one)


@dataclass
class NormalizeConfig:
    fold_homophones: bool = False  # off for training text; dedup and decontamination keys always fold
    fold_labialized: bool = False


@dataclass
class BoilerplateConfig:
    """A line is boilerplate when its shape (digits masked) occurs in at least `min_docs` documents."""

    enabled: bool = True
    min_docs: int = 10
    max_line_chars: int = 200  # longer lines are never treated as boilerplate
    drop_non_text_lines: bool = True  # lines with no letter at all: page numbers, '***', separators


@dataclass
class FilterConfig:
    min_ethiopic_share: float = 0.5
    languages: list[str] = field(default_factory=lambda: ["am"])
    min_chars: int = 10  # non-space characters; 20 would drop real 3-word tweets ("የኔ ጀግና በሰላም ተመለስ")
    min_words: int = 3
    min_quality: float = 50.0  # scores split into 0-10 (spam, refrains) and >= 50; every FLORES line >= 87


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1


@dataclass
class DecontamConfig:
    enabled: bool = True
    sets: list[str] | None = None  # None: every eval set in the registry
    n: int = 8
    min_shared: int = 3  # a line must share min(min_shared, ceil(min_coverage * N)) of a unit's N n-grams
    min_coverage: float = 0.5
    max_contaminated_fraction: float = 0.5


@dataclass
class SplitConfig:
    val_fraction: float = 0.01
    test_fraction: float = 0.01
    seed: str = "fidellm"
    min_source_docs: int = 10  # a source with this many documents gets at least one in every split; 0: off


@dataclass
class PrepareConfig:
    sources: SourceSelection = field(default_factory=SourceSelection)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    boilerplate: BoilerplateConfig = field(default_factory=BoilerplateConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tasks: int = 2
    workers: int = 2

    def validate(self) -> PrepareConfig:
        split = self.split
        if not (0 <= split.val_fraction < 1 and 0 <= split.test_fraction < 1):
            raise FidelError("split fractions must lie in [0, 1)")
        if split.val_fraction + split.test_fraction >= 1:
            raise FidelError("split: val_fraction + test_fraction must be < 1")
        if split.min_source_docs < 0 or split.min_source_docs in (1, 2):  # a source needs one per split
            raise FidelError(f"split.min_source_docs must be 0 (off) or >= 3, got {split.min_source_docs}")
        if self.tasks < 1 or self.workers < 1:
            raise FidelError("tasks and workers must be >= 1")
        if not 0 <= self.filters.min_quality <= 100:
            raise FidelError("filters.min_quality must lie in [0, 100]")
        bad = {w for w in self.sources.weights.values() if not isinstance(w, (int, float)) or w < 0}
        if bad:
            raise FidelError(f"sources.weights must be numbers >= 0, got {sorted(map(str, bad))}")
        positive = {
            "dedup.n_grams": self.dedup.n_grams,
            "dedup.num_buckets": self.dedup.num_buckets,
            "dedup.hashes_per_bucket": self.dedup.hashes_per_bucket,
            "decontam.n": self.decontam.n,
            "boilerplate.min_docs": self.boilerplate.min_docs,
        }  # counts and sizes the pipeline divides by or slices with: 0 fails deep inside datatrove
        for name, value in positive.items():
            if value < 1:
                raise FidelError(f"{name} must be >= 1, got {value}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_EXPECTED = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    tuple: "a list",
    dict: "a mapping",
}
"""Field type -> how an error names it; fields of other types are not checked."""


def _type_problem(hint: Any, value: Any, key: str) -> str | None:
    """Why `value` does not fit the annotation `hint` ("KEY: expected an integer, got 'one'"), or None.

    YAML gives plain values, so a wrong one would otherwise fail later as a TypeError deep in the
    pipeline. An int fits a float field; a bool is not a number; list/dict items are checked too."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):  # X | None: the only unions the config uses
        if value is None and type(None) in args:
            return None
        hint = next(arg for arg in args if arg is not type(None))
        origin, args = get_origin(hint), get_args(hint)
    kind = origin or hint
    if kind not in _EXPECTED:
        return None
    if kind in (int, float):
        fits = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    else:
        fits = isinstance(value, (list, tuple) if kind in (list, tuple) else kind)
    if not fits:
        return f"{key}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind in (list, tuple) and args:  # list[X] or tuple[X, ...]
        problems = (_type_problem(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    elif kind is dict and args:
        problems = (
            _type_problem(args[0], k, f"{key} (key {k!r})") or _type_problem(args[1], v, f"{key}.{k}")
            for k, v in value.items()
        )
    else:
        return None
    return next((problem for problem in problems if problem), None)


def _build(cls: type, values: Any, path: str, key: str = "") -> Any:
    """Instantiate dataclass `cls` from the mapping at `key` of the file at `path`, naming unknown keys
    and wrong-typed values precisely ("cfg.yaml: filters.min_chars: expected an integer, got 'abc'")."""
    where = f"{path}: {key}" if key else path
    if not isinstance(values, dict):
        raise FidelError(f"{where}: expected a mapping, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise FidelError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        dotted = f"{key}.{name}" if key else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, path, dotted)
            continue
        problem = _type_problem(hints[name], value, dotted)
        if problem:
            raise FidelError(f"{path}: {problem}")
        kwargs[name] = value
    return cls(**kwargs)


def load_prepare_config(path: str | Path | None) -> PrepareConfig:
    """The defaults, overridden by the YAML file at `path` if given."""
    if path is None:
        return PrepareConfig().validate()
    path = Path(path)
    if not path.is_file():
        raise FidelError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise FidelError(f"{path}: invalid YAML: {error}") from None
    config = _build(PrepareConfig, values, str(path))
    try:
        return config.validate()
    except FidelError as error:
        raise FidelError(f"{path}: {error}") from None
