"""The serving engine: a bounded queue in front of one continuously batched decoding loop.

Continuous batching: a single worker steps every running sequence together, and between two decode
steps it admits waiting requests (their prompts are prefilled as one batch, then merged into the
running batch; `fidellm.generate.batch`) and drops the sequences that finished, were cancelled (the
client went away) or ran past their deadline, so their slots are free at the next step. At most
`max_batch` sequences decode at once: a request whose prompts × `n` exceed the free slots is admitted
a few whole prompts (all `n` choices of each) at a time as slots free up, and the requests behind it
wait until its last prompt has started; only a single prompt whose `n` alone exceeds `max_batch`
(at most `schemas.MAX_N`) decodes beyond it, alone. A sliced request's events and answer still cover
all its rows, and every row keeps its own seed: its client gets what one batch of all of them gives.

Chunked prefill: an iteration feeds at most `prefill_chunk` prompt positions (the padded batch's rows
× columns), so a long prompt is prefilled over several iterations, each after a decode step of the
running sequences: their next tokens wait for one chunk, not for the whole prompt. Waiting prompts are
fed oldest first; one that fits in what is left of the budget takes its first step in the same
iteration. While nothing decodes, prompts are fed whole.
H-Net batches cannot merge (per-level routing caches), so each admitted group of H-Net requests
decodes as its own batch, all groups advancing one step per iteration.

Model work runs in a worker thread so the event loop keeps accepting requests, answering /health and
streaming. A full queue refuses new work (503).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from fidellm.errors import FidelError
from fidellm.generate.batch import DecodeBatch, DecodeRow, new_rows
from fidellm.generate.engine import GenerationConfig, GenerationResult
from fidellm.serve.metrics import ServerMetrics
from fidellm.tokenizer.base import TextTokenizer

log = logging.getLogger(__name__)

TokenScore = tuple[int, float | None, list[tuple[int, float]] | None]
"""(token id, its log-probability or None for the first prompt token, the top alternatives or None)."""


SCORE_POSITIONS = 2048
"""Padded positions (rows × length) per forward pass when scoring prompts: bounds the pass's logits
(2048 × a 32K vocabulary in fp32 is 256 MB)."""


class QueueFullError(Exception):
    """The engine's queue is full."""


class RequestTimeoutError(Exception):
    """The request ran past its deadline."""


@dataclass
class Job:
    """One request: token-id prompts (one per choice), how to decode them, and where events go.

    Events on `events`: ("chunks", [text per row]) after every decode step, then ("done", results,
    scores) or ("error", exception). `config` None means no new tokens (max_tokens 0, e.g. echo scoring).
    `score_top` None = no log-probabilities; else each row's generated tokens (and its prompt's too
    when `score_from_start`) are scored with that many most likely alternatives. `choices` = rows per
    prompt (consecutive): choice j of every prompt samples with seed + j, as vLLM seeds a request's n
    choices, so a prompt's text never depends on the other prompts sent with it. `started` counts the
    rows admitted so far (whole prompts at a time, module docstring); `rows` holds all of them from
    the first admission on, so events and results always cover every row."""

    prompts: list[list[int]]
    config: GenerationConfig | None
    timeout: float
    choices: int = 1
    score_from_start: bool = False
    score_top: int | None = None
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    rows: list[DecodeRow] = field(default_factory=list)
    started: int = 0
    last_step: float | None = None
    answered: bool = False  # its "done" or "error" event was sent

    @property
    def deadline(self) -> float:
        return self.arrival + self.timeout

    def emit(self, *event: Any) -> None:
        self.answered = self.answered or event[0] in ("done", "error")
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


class Admission(NamedTuple):
    """Rows `start` to `stop` (whole prompts) of `job`, admitted to start in this iteration."""

    job: Job
    start: int
    stop: int


class Engine:
    """Owns the model: a bounded asyncio queue of jobs and one continuously batched decoding loop."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        queue_size: int,
        metrics: ServerMetrics,
        max_batch: int = 16,
        prefill_chunk: int = 512,
    ):
        if prefill_chunk < 0:
            raise FidelError(f"prefill_chunk must be 0 (whole prompts) or positive, got {prefill_chunk}")
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.queue_size, self.max_batch, self.prefill_chunk = queue_size, max_batch, prefill_chunk
        self._queue: asyncio.Queue[Job] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._held: Job | None = None  # taken from the queue, waiting for free slots for (more of) its rows
        self.running: list[Job] = []
        self.batches: list[DecodeBatch] = []
        self.prefilling: list[DecodeBatch] = []  # admitted, prompts partly fed; oldest first

    @property
    def active_rows(self) -> int:
        """Sequences decoding or being prefilled now (finished rows of an H-Net batch hold their slot)."""
        return sum(len(batch.rows) for batch in self.batches + self.prefilling)

    @property
    def waiting(self) -> int:
        """Requests not yet admitted: those queued and the one held until slots free up (unless some of
        its prompts already run: it is running then)."""
        held = self._held is not None and self._held.started == 0
        return (self._queue.qsize() if self._queue is not None else 0) + held

    def _ensure_worker(self) -> asyncio.Queue[Job]:
        """Start the worker on the running loop the first time (works without ASGI lifespan events)."""
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()  # bounded by `submit`, which counts the held job too
            self._worker = asyncio.get_running_loop().create_task(self._work())
        return self._queue

    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFullError when `queue_size` requests already wait."""
        queue = self._ensure_worker()
        if self.waiting >= self.queue_size:
            raise QueueFullError
        queue.put_nowait(job)
        self._update_gauges()

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    def _update_gauges(self) -> None:
        self.metrics.waiting.set(self.waiting)
        self.metrics.running.set(len(self.running))

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            if not self.running and self._held is None:
                self._held = await self._queue.get()
            admitted = self._admit()
            self._update_gauges()
            await asyncio.to_thread(self._iterate, admitted)
            self._update_gauges()

    def _admit(self) -> list[Admission]:
        """The rows to start now, in arrival order: of each waiting job as many whole prompts (all their
        choices) as the free slots hold; a job not started whole stays held, the jobs behind it wait. A
        prompt with more choices than `max_batch`, and a scoring-only job (nothing to decode) that does
        not fit, start whole, only when no row is active."""
        assert self._queue is not None
        admitted: list[Admission] = []
        free = max(0, self.max_batch - self.active_rows)  # below 0 while an oversized prompt runs
        while True:
            if self._held is None:
                if self._queue.empty():
                    break
                self._held = self._queue.get_nowait()
            job = self._held
            if job.cancelled.is_set() or job.answered:  # gone, or failed or late after its first rows
                self._held = None
                continue
            left = len(job.prompts) - job.started
            step = left if job.config is None else job.choices
            rows = min(left, free // step * step)
            if not rows and self.active_rows == 0 and not admitted:
                rows = step
            if not rows:
                break
            admitted.append(Admission(job, job.started, job.started + rows))
            job.started += rows
            free = max(0, free - rows)
            if job.started < len(job.prompts):
                break
            self._held = None
        return admitted

    def _iterate(self, admitted: list[Admission]) -> None:
        """One engine iteration in the worker thread: a decode step of every running batch, the prefill
        of the admitted jobs, then results for finished jobs and free slots for gone ones."""
        try:
            with torch.inference_mode():
                self._decode_step()
                self._prefill(admitted)
                self._retire()
        except Exception as error:  # a bug must not kill the worker; its clients get a 500
            log.exception("generation failed")
            for job in {id(job): job for job in self.running + [a.job for a in admitted]}.values():
                if not job.answered:
                    job.emit("error", error)
            self.running, self.batches, self.prefilling = [], [], []

    def _decode_step(self) -> None:
        for batch in self.batches:
            self._emit_chunks(batch, batch.step())

    def _prefill(self, admitted: list[Admission]) -> None:
        """Start the admitted rows: they form one batch that waits for its prefill (`_feed_prompts`).
        At its first admission a job is checked against its deadline and gets all its rows (a
        scoring-only job finishes at once)."""
        rows: list[DecodeRow] = []
        for job, start, stop in admitted:
            if start == 0 and not self._start(job):
                continue
            rows.extend(job.rows[start:stop])
        if rows:
            try:
                self.prefilling.append(DecodeBatch(self.model, self.tokenizer, rows))
            except Exception as error:
                self._fail(_owners(rows), error)
        self._feed_prompts()

    def _start(self, job: Job) -> bool:
        """Count the job's prompt tokens and build all its rows (choice j of every prompt seeded seed +
        j); False when it is answered already (late, scoring-only, or its rows cannot be built)."""
        if time.perf_counter() > job.deadline:
            job.emit("error", RequestTimeoutError())
            return False
        self.metrics.prompt_tokens.inc(sum(len(p) for p in job.prompts))
        if job.config is None:
            self._complete(job, [GenerationResult(prompt_ids=list(p)) for p in job.prompts])
            return False
        try:
            groups = [job.prompts[i : i + job.choices] for i in range(0, len(job.prompts), job.choices)]
            job.rows = [
                row
                for group in groups
                for row in new_rows(self.model, self.tokenizer, group, job.config, owner=job)
            ]
        except Exception as error:  # this request fails; the running ones go on
            self._fail([job], error)
            return False
        self.running.append(job)
        return True

    def _feed_prompts(self) -> None:
        """Prefill waiting batches within this iteration's budget (module docstring), oldest first. A
        batch whose prompts are all fed takes its first step and joins the running batch (a batch of
        its own when it cannot merge); an H-Net batch is always prefilled whole, and so is every batch
        while nothing decodes (no one waits for the next token)."""
        budget = self.prefill_chunk if self.prefill_chunk and self.batches else None
        while self.prefilling and (budget is None or budget > 0):
            batch = self.prefilling[0]
            cost = len(batch.rows) * batch.prompt_left
            part = budget is not None and cost > budget and batch.chunkable and batch.prompt_left > 1
            try:
                if part:
                    batch.prefill_part(max(1, budget // len(batch.rows)))
                    return
                chunks = batch.step()
            except Exception as error:  # only this batch's requests fail
                self.prefilling.pop(0)
                self._fail(_owners(batch.rows), error)
                continue
            self.prefilling.pop(0)
            self._emit_chunks(batch, chunks)
            main = next((b for b in self.batches if b.reshapable), None)
            if main is not None and batch.reshapable:
                main.merge(batch)
            else:
                self.batches.append(batch)
            if budget is not None:
                budget -= cost

    def _emit_chunks(self, batch: DecodeBatch, chunks: list[str]) -> None:
        """Send each job with rows in `batch` the text its rows produced in this step (in its rows'
        order), and time the step."""
        stepped = {id(row): text for row, text in zip(batch.rows, chunks, strict=True)}
        moment = time.perf_counter()
        for job in self.running:
            if not any(id(row) in stepped for row in job.rows):
                continue
            if job.last_step is None:
                self.metrics.ttft.observe(moment - job.arrival)
            else:
                self.metrics.itl.observe(moment - job.last_step)
            job.last_step = moment
            job.emit("chunks", [stepped.get(id(row), "") for row in job.rows])

    def _retire(self) -> None:
        """Finish done jobs, stop cancelled and timed-out ones, and drop their rows from the batches.
        The running gauge drops before any client can see its outcome."""
        still, finished, late = [], [], []
        now = time.perf_counter()
        for job in self.running:
            if job.cancelled.is_set():
                self._stop_rows(job)
            elif all(row.finished for row in job.rows):
                finished.append(job)
            elif now > job.deadline:
                self._stop_rows(job)
                late.append(job)
            else:
                still.append(job)
        self.running = still
        self.metrics.running.set(len(still))
        for job in finished:
            self._complete(job, [row.result for row in job.rows])
        for job in late:
            job.emit("error", RequestTimeoutError())
        self.prefilling = [batch for batch in self.prefilling if not batch.done]
        kept: list[DecodeBatch] = []
        for batch in self.batches:
            if batch.done:
                continue
            if batch.reshapable:
                live = [i for i, row in enumerate(batch.rows) if not row.finished]
                if len(live) < len(batch.rows):
                    batch.keep(live)
            kept.append(batch)
        self.batches = kept

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        """Answer `jobs` with `error` (a 400 for a FidelError, else a 500) and drop them from the running
        jobs; the others keep decoding. Called while handling `error`, so its traceback is logged."""
        if not isinstance(error, FidelError):
            log.exception("starting a request failed")
        failed = {id(job) for job in jobs}
        self.running = [job for job in self.running if id(job) not in failed]
        for job in jobs:
            self._stop_rows(job)
            job.emit("error", error)

    @staticmethod
    def _stop_rows(job: Job) -> None:
        for row in job.rows:
            row.finished = True

    def _complete(self, job: Job, results: list[GenerationResult]) -> None:
        """The job's final event, with log-probabilities when asked; a scoring failure is its error."""
        try:
            scores = self._score_all(results, job) if job.score_top is not None else None
        except Exception as error:
            log.exception("scoring failed")
            job.emit("error", error)
            return
        self.metrics.generation_tokens.inc(sum(len(r.token_ids) for r in results))
        self.metrics.e2e.observe(time.perf_counter() - job.arrival)
        for result in results:
            self.metrics.requests.labels(result.finish_reason).inc()
        job.emit("done", results, scores)

    @torch.inference_mode()
    def _score_all(self, results: list[GenerationResult], job: Job) -> list[list[TokenScore]]:
        """Log-probabilities (the model's raw log-softmax) of each result's prompt tokens (from the first,
        when `score_from_start`) or of its generated ones, with the `score_top` most likely alternatives.

        The forward passes are batched: rows right-padded (a causal model's logits at a position do not
        depend on what follows it), longest first, at most SCORE_POSITIONS padded positions a pass (one
        longer row alone), and only the logits from the first scored position on are kept."""
        ids = [result.prompt_ids + result.token_ids for result in results]
        starts = [0 if job.score_from_start else len(result.prompt_ids) for result in results]
        scores: list[list[TokenScore]] = [
            [(seq[0], None, None)] if start == 0 else [] for seq, start in zip(ids, starts, strict=True)
        ]
        starts = [max(1, start) for start in starts]  # the first token has no prediction
        todo = sorted((i for i, seq in enumerate(ids) if starts[i] < len(seq)), key=lambda i: -len(ids[i]))
        device = next(self.model.parameters()).device
        while todo:
            width = len(ids[todo[0]]) - 1  # the longest row's inputs: every token but its last
            rows = max(1, SCORE_POSITIONS // width)
            batch, todo = todo[:rows], todo[rows:]
            inputs = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
            for row, i in enumerate(batch):
                inputs[row, : len(ids[i]) - 1] = torch.tensor(ids[i][:-1])
            first = min(starts[i] - 1 for i in batch)  # the earliest position predicting a scored token
            logits = self.model(inputs.to(device), logits_to_keep=width - first).logits
            for row, i in enumerate(batch):
                predicting = logits[row, starts[i] - 1 - first : len(ids[i]) - 1 - first]
                scores[i] += self._token_scores(predicting, ids[i][starts[i] :], job.score_top or 0)
        return scores

    def _token_scores(self, logits: torch.Tensor, targets: list[int], top: int) -> list[TokenScore]:
        """(token, log-probability, `top` alternatives) of each target from the logits predicting it."""
        vocab = min(self.tokenizer.vocab_size, logits.shape[-1])
        logprobs = torch.log_softmax(logits[:, :vocab].float(), dim=-1)
        top_values, top_ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
        chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
        return [
            (token, value, list(zip(ids, values, strict=True)))
            for token, value, ids, values in zip(
                targets, chosen, top_ids.tolist(), top_values.tolist(), strict=True
            )
        ]


def _owners(rows: list[DecodeRow]) -> list[Job]:
    """The jobs that asked for `rows`, once each, in order."""
    return list({id(row.owner): row.owner for row in rows}.values())
