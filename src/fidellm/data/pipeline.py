"""`fidellm data prepare`: the data stages assembled as datatrove pipelines.

Stages (each a datatrove pipeline, run one after another; at scale each becomes a Slurm/Ray job chained
with `depends=`, see README "Scaling out"):

1. count    sources -> normalize -> line-shape document frequencies + exact-duplicate keys
2. filter   sources -> normalize -> exact dedup -> boilerplate -> decontaminate -> script / language /
            length / quality filters -> work/filtered
3. minhash  signatures, 4. buckets, 5. clusters (datatrove's MinHash LSH with an Amharic word tokenizer)
6. split    work/filtered -> drop near duplicates -> train/val/test by a hash of the document id -> splits/
            (then a small corpus's empty val/test get one document each: `fidellm.data.splits`)

Every document that leaves the pipeline is accounted for: kept (splits/), dropped with a reason
(dropped/<reason>/), or rejected as unreadable (rejected/, with file:line). The report checks that
read = kept + dropped + rejected for every source.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from fidellm.data.amharic import normalize
from fidellm.data.boilerplate import BoilerplateRemover, CollapseCopies, CorpusCounter, ExactDedup
from fidellm.data.config import PrepareConfig
from fidellm.data.decontam import Decontaminate
from fidellm.data.dedup import AmharicMinhashSignature, minhash_config
from fidellm.data.filters import LanguageFilter, LengthFilter, QualityFilter, ScriptFilter
from fidellm.data.markup import strip_markup
from fidellm.data.readers import Rejection
from fidellm.data.registry import SourceSpec, load_registry, select_sources
from fidellm.data.sources import iter_documents
from fidellm.data.splits import SplitAssigner, fill_splits, required_splits
from fidellm.data.writers import GzipJsonlWriter
from fidellm.errors import FidelError
from fidellm.paths import RunLayout, staged_output_dir


class SourceReader(PipelineStep):
    """Reads the selected registry sources, sharded by record across ranks; logs rejections with file:line.
    Counts per source: source records read, documents made of them (fewer with `group_by`), rejected records.
    A source's markup (`markup: wikitext`) is stripped here, so every later stage sees the plain text."""

    name = "📖 registry sources"
    type = "📖 - READER"

    def __init__(
        self,
        specs: list[SourceSpec],
        data_dir: Path,
        weights: dict[str, float],
        rejected_folder: Path | None = None,
        accounting_folder: Path | None = None,
    ):
        super().__init__()
        self.specs = specs
        self.data_dir = Path(data_dir)
        self.weights = weights
        self.rejected_folder = rejected_folder
        self.accounting_folder = accounting_folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        rejected = _open_jsonl(self.rejected_folder, rank)
        try:
            for spec in self.specs:
                for item in iter_documents(spec, self.data_dir, rank=rank, world_size=world_size):
                    if isinstance(item, Rejection):
                        counts[spec.name]["rejected"] += item.records
                        counts[spec.name]["records"] += item.records
                        self.stat_update(f"rejected_{spec.name}")
                        if rejected is not None:
                            rejected.write(json.dumps(asdict(item), ensure_ascii=False, default=str) + "\n")
                        continue
                    counts[spec.name]["documents"] += 1
                    counts[spec.name]["records"] += item.metadata.get("records", 1)
                    self.stat_update(f"read_{spec.name}")
                    if spec.markup != "none":
                        with self.track_time():
                            before = len(item.text)
                            item.text = strip_markup(item.text, spec.markup)
                        counts[spec.name]["markup_chars_removed"] += before - len(item.text)
                    if spec.name in self.weights:
                        item.metadata["weight"] = float(self.weights[spec.name])
                    yield item
        finally:
            if rejected is not None:
                rejected.close()
        if self.accounting_folder is not None:
            self.accounting_folder.mkdir(parents=True, exist_ok=True)
            (self.accounting_folder / f"{rank:05d}.json").write_text(json.dumps(counts))


def _open_jsonl(folder: Path | None, rank: int):
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"{rank:05d}.jsonl", "w", encoding="utf-8")


class Normalize(PipelineStep):
    """The Amharic normalizer applied to every document; documents left empty are dropped as `empty`."""

    name = "🔤 amharic normalize"
    type = "✂️ - FORMAT"

    def __init__(
        self, fold_homophones: bool, fold_labialized: bool, exclusion_writer: JsonlWriter | None = None
    ):
        super().__init__()
        self.fold_homophones = fold_homophones
        self.fold_labialized = fold_labialized
        self.exclusion_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.exclusion_writer or contextlib.nullcontext() as writer:
            for doc in data:
                with self.track_time():
                    doc.text = normalize(
                        doc.text, fold_homophones=self.fold_homophones, fold_labialized=self.fold_labialized
                    ).strip()
                if not doc.text:
                    self.stat_update("dropped_empty")
                    doc.metadata["filter_reason"] = "empty"
                    if writer is not None:
                        writer.write(doc, rank)
                    continue
                yield doc


@dataclass
class Stage:
    name: str
    pipeline: list[PipelineStep]
    tasks: int


class PrepareLayout:
    """Paths of `fidellm data prepare` inside RUN/data."""

    def __init__(self, run_dir: str | Path, root: Path | None = None):
        self.root = root if root is not None else RunLayout(run_dir).data
        self.work = self.root / "work"
        self.splits = self.root / "splits"
        self.dropped = self.root / "dropped"
        self.rejected = self.root / "rejected"
        self.logs = self.root / "logs"
        self.counts = self.work / "counts"
        self.read_counts = self.work / "read"
        self.filtered = self.work / "filtered"
        self.minhash = self.work / "minhash"
        self.boilerplate_examples = self.work / "boilerplate"

    def dropped_writer(self, reason: str) -> JsonlWriter:
        return GzipJsonlWriter(str(self.dropped / reason), output_filename="${rank}.jsonl.gz")


def build_stages(
    layout: PrepareLayout, data_dir: Path, specs: list[SourceSpec], config: PrepareConfig
) -> list[Stage]:
    """The pipelines of `data prepare`, for any datatrove executor (local here; Slurm/Ray at scale)."""
    weights = config.sources.weights
    norm = config.normalize
    filters = config.filters
    tasks = config.tasks

    def reader(final: bool) -> SourceReader:
        if not final:
            return SourceReader(specs, data_dir, weights)
        return SourceReader(specs, data_dir, weights, layout.rejected, layout.read_counts)

    filter_steps: list[PipelineStep] = [
        reader(final=True),
        Normalize(norm.fold_homophones, norm.fold_labialized, layout.dropped_writer("empty")),
    ]
    if config.dedup.exact:
        filter_steps.append(ExactDedup(layout.counts, layout.dropped_writer("exact_duplicate")))
    if config.boilerplate.enabled or config.boilerplate.drop_non_text_lines:
        filter_steps.append(
            BoilerplateRemover(
                layout.counts,
                layout.boilerplate_examples,
                config.boilerplate,
                layout.dropped_writer("boilerplate_only"),
            )
        )
    filter_steps.append(CollapseCopies())
    if config.decontam.enabled:
        filter_steps.append(
            Decontaminate(
                data_dir=data_dir,
                sets=config.decontam.sets,
                n=config.decontam.n,
                max_contaminated_fraction=config.decontam.max_contaminated_fraction,
                min_shared=config.decontam.min_shared,
                min_coverage=config.decontam.min_coverage,
                exclusion_writer=layout.dropped_writer("contaminated"),
                extra_registry=config.sources.extra_registry,
            )
        )
    filter_steps += [
        ScriptFilter(
            min_ethiopic_share=filters.min_ethiopic_share, exclusion_writer=layout.dropped_writer("script")
        ),
        LanguageFilter(expected=tuple(filters.languages), exclusion_writer=layout.dropped_writer("language")),
        LengthFilter(
            min_chars=filters.min_chars,
            min_words=filters.min_words,
            exclusion_writer=layout.dropped_writer("length"),
        ),
        QualityFilter(min_score=filters.min_quality, exclusion_writer=layout.dropped_writer("quality")),
        JsonlWriter(str(layout.filtered), output_filename="${rank}.jsonl", compression=None),
    ]

    stages = [
        Stage(
            "count",
            [
                reader(final=False),
                Normalize(norm.fold_homophones, norm.fold_labialized),
                CorpusCounter(layout.counts, config.boilerplate),
            ],
            tasks,
        ),
        Stage("filter", filter_steps, tasks),
    ]

    def filtered_reader() -> JsonlReader:
        return JsonlReader(str(layout.filtered), compression=None, add_file_path=False)

    final: list[PipelineStep] = [filtered_reader()]
    if config.dedup.near:
        mh = minhash_config(config.dedup)
        stages += [
            Stage(
                "minhash",
                [
                    filtered_reader(),
                    AmharicMinhashSignature(output_folder=str(layout.minhash / "sigs"), config=mh),
                ],
                tasks,
            ),
            Stage(
                "buckets",
                [
                    MinhashDedupBuckets(
                        input_folder=str(layout.minhash / "sigs"),
                        output_folder=str(layout.minhash / "buckets"),
                        config=mh,
                    )
                ],
                mh.num_buckets,
            ),
            Stage(
                "clusters",
                [
                    MinhashDedupCluster(
                        input_folder=str(layout.minhash / "buckets"),
                        output_folder=str(layout.minhash / "remove"),
                        config=mh,
                    )
                ],
                1,
            ),
        ]
        final.append(
            MinhashDedupFilter(str(layout.minhash / "remove"), layout.dropped_writer("near_duplicate"))
        )
    final += [
        SplitAssigner(config.split),
        GzipJsonlWriter(str(layout.splits), output_filename="${split}/${rank}.jsonl.gz"),
    ]
    stages.append(Stage("split", final, tasks))
    return stages


@contextlib.contextmanager
def _stderr_to(path: Path, enabled: bool) -> Iterator[None]:
    """Send datatrove's per-task logging (fd 2, inherited by workers) to a file unless verbose."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def run_stages(
    stages: list[Stage],
    layout: PrepareLayout,
    workers: int,
    quiet: bool = True,
    after: Callable[[str, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Run the stages one after another with datatrove's local executor; returns wall seconds per stage.
    `after(stage name, timings so far)` runs after each stage and may stop the run by raising."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    timings: dict[str, float] = {}
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False
    ) as bar:
        for index, stage in enumerate(stages, 1):
            task = bar.add_task(f"[{index}/{len(stages)}] {stage.name}", total=1)
            start = time.perf_counter()
            executor = LocalPipelineExecutor(
                pipeline=stage.pipeline,
                tasks=stage.tasks,
                workers=min(workers, stage.tasks),
                logging_dir=str(layout.logs / stage.name),
                skip_completed=False,
            )
            try:
                with _stderr_to(layout.logs / "datatrove.log", quiet):
                    executor.run()
            except FidelError:
                raise
            except Exception as error:  # a worker failed: point at its log rather than dumping a traceback
                raise FidelError(
                    f"data prepare stage '{stage.name}' failed ({type(error).__name__}: {error}); "
                    f"see {layout.logs / stage.name / 'logs'}"
                ) from None
            timings[stage.name] = time.perf_counter() - start
            bar.update(task, completed=1)
            if after is not None:
                after(stage.name, timings)
    return timings


def prepare(
    run_dir: str | Path,
    data_dir: Path,
    config: PrepareConfig,
    overwrite: bool = False,
    quiet: bool = True,
) -> dict:
    """Run `data prepare` into RUN/data and write its report; returns the report as a dict. An existing
    RUN/data is replaced only with `overwrite`, and only once the new one is complete (a failed run's
    output stays in RUN/data.partial)."""
    registry = load_registry(config.sources.extra_registry)
    sel = config.sources
    specs = select_sources(
        registry, names=sel.include, licence_families=sel.licence_families, exclude=sel.exclude
    )
    if not specs:
        raise FidelError(
            "no source selected: check sources.include / exclude / licence_families in the config"
        )
    unknown = sorted(set(sel.weights) - {spec.name for spec in specs})
    if unknown:
        raise FidelError(f"sources.weights names source(s) not selected: {unknown}")
    with staged_output_dir(RunLayout(run_dir).data, overwrite) as root:
        return _prepare_into(PrepareLayout(run_dir, root), data_dir, specs, config, quiet)


def _source_counts(name: str, info: dict) -> str:
    """`name: read N, rejected R (reason n, …), dropped D (reason n, …)` from a report's source entry."""

    def by_reason(counts: dict[str, int]) -> str:
        return f" ({', '.join(f'{reason} {n:,}' for reason, n in counts.items())})" if counts else ""

    rejected = f"rejected {info['rejected']:,}{by_reason(info['rejected_by_reason'])}"
    dropped = f"dropped {info['dropped']:,}{by_reason(info['dropped_by_reason'])}"
    return f"{name}: read {info['records_read']:,}, {rejected}, {dropped}"


def _prepare_into(
    layout: PrepareLayout, data_dir: Path, specs: list[SourceSpec], config: PrepareConfig, quiet: bool
) -> dict:
    """`prepare`'s stages and report, written under `layout.root`."""
    from fidellm.data.report import write_report

    def require_survivors(stage: str, timings: dict[str, float]) -> None:
        """After the filter stage: stop with the per-source counts when no document is left (the near
        dedup and split stages would fail on the empty folder, naming neither sources nor reasons)."""
        if stage != "filter" or any(p.stat().st_size for p in layout.filtered.glob("*.jsonl")):
            return
        report = write_report(layout, specs, config, data_dir, timings)
        counts = "; ".join(_source_counts(name, info) for name, info in report["sources"].items())
        raise FidelError(
            f"no document survived reading and filtering ({counts}); see {layout.root / 'report.md'}"
            " (rejected/ and dropped/ beside it list every record)"
        )

    stages = build_stages(layout, data_dir, specs, config)
    timings = run_stages(stages, layout, config.workers, quiet=quiet, after=require_survivors)
    started = time.perf_counter()
    empty = fill_splits(layout.splits, config.split)
    timings["fill_splits"] = round(time.perf_counter() - started, 2)
    report = write_report(layout, specs, config, data_dir, timings)
    if empty:
        raise FidelError(
            f"{layout.splits}: only {report['totals']['kept_docs']} document(s) kept, fewer than the"
            f" {len(required_splits(config.split))} splits ({', '.join(required_splits(config.split))}) that"
            f" need one each, so {', '.join(empty)} stayed empty; {layout.root / 'report.md'} shows what"
            " was dropped"
        )
    return report
