"""Label-likelihood classification: the continuation scorer by hand on a bigram stub, the SIB-200 loader on
the real data, k-shot sampling and context fit, the lm-eval task files, and lm-eval itself agreeing with our
scorer on an exported tiny model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
import zstandard

from fidellm.errors import FidelError
from fidellm.eval.downstream.likelihood import continuation_logprobs, encode_pair, score_choices
from fidellm.eval.downstream.lmeval import run_lm_eval, write_lmeval_tasks
from fidellm.eval.downstream.sib import (
    AFRISENTI_TASK,
    SIB_TASK,
    FunctionRef,
    TaskYamlLoader,
    build_prompts,
    evaluate_afrisenti_likelihood,
    evaluate_choice_task,
    evaluate_sib,
    load_choice_task,
    load_sib200,
    task_splits,
)
from fidellm.export.hf import export_hf
from fidellm.paths import resolve_data_dir
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe
from fixtures.models import ScriptedLM, WrappedLM, gqa_config, random_llama

# ---------------------------------------------------------------------------------------------- stubs

ALPHABET = "abcx "
BOS, PAD = 0, 1
A, B, C, X, SPACE = (2 + ALPHABET.index(ch) for ch in ALPHABET)
VOCAB = 2 + len(ALPHABET)


class CharTokenizer:
    """One id per character; "ba" is one merged token (id MERGED), so a context ending in "b" and a
    continuation starting with "a" tokenize differently together than apart."""

    MERGED = VOCAB
    bos_id, pad_id = BOS, PAD

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids, i = [BOS] if add_bos else [], 0
        while i < len(text):
            if text.startswith("ba", i):
                ids.append(self.MERGED)
                i += 2
            else:
                ids.append(2 + ALPHABET.index(text[i]))
                i += 1
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        return [self.encode(text, add_bos) for text in texts]


def bigram_logprobs() -> torch.Tensor:
    """log P(next | previous): uniform except after "a" (b 0.3, c 0.5) and after "c" (c 0.5)."""
    probs = torch.full((VOCAB + 1, VOCAB + 1), 1.0 / (VOCAB + 1), dtype=torch.float64)
    probs[A] = 0.2 / (VOCAB - 1)
    probs[A, B], probs[A, C] = 0.3, 0.5
    probs[C] = 0.5 / VOCAB
    probs[C, C] = 0.5
    return probs.log()


class Bigram(ScriptedLM):
    """Logits = log P(next | this token), so every log-probability is a product of table entries; records
    the inputs it was given."""

    def __init__(self, max_length: int = 64):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=max_length)
        self.table = bigram_logprobs()
        self.inputs: list[list[list[int]]] = []

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.inputs.append(input_ids.tolist())
        return self.table[input_ids].float()


# ---------------------------------------------------------------------------------------------- scorer


def test_log_probability_of_a_continuation_by_hand():
    model, tok = Bigram(), CharTokenizer()
    (one, two) = continuation_logprobs(model, tok, ["xa", "xa"], ["c", "cc"], batch_size=2)
    assert one.logprob == pytest.approx(math.log(0.5), abs=1e-6)
    assert (one.tokens, one.bytes, one.greedy) == (1, 1, True)  # c is the most likely after a
    assert two.logprob == pytest.approx(math.log(0.5 * 0.5), abs=1e-6)
    assert (two.tokens, two.bytes, two.greedy) == (2, 2, True)
    (after_x,) = continuation_logprobs(model, tok, ["a"], ["x"])
    assert after_x.logprob == pytest.approx(math.log(0.2 / (VOCAB - 1)), abs=1e-6)
    assert after_x.greedy is False


def test_context_continuation_split_follows_lm_eval():
    tok = CharTokenizer()
    # whole "xba" merges b+a: the continuation is what follows the context's token count (nothing here)
    assert encode_pair(tok, "xb", "a") == ([BOS, X, B], [])
    # "xxb"+"ac" -> whole [BOS x x BA c]; context [BOS x x b] (4 ids) -> continuation [c] alone
    assert encode_pair(tok, "xxb", "ac") == ([BOS, X, X, B], [C])
    # trailing context whitespace moves to the continuation
    assert encode_pair(tok, "xa ", "c") == ([BOS, X, A], [SPACE, C])
    # empty context: BOS alone conditions the continuation
    assert encode_pair(tok, "", "ca") == ([BOS], [C, A])
    model = Bigram()
    (merged,) = continuation_logprobs(model, tok, ["xxb"], ["ac"])
    assert model.inputs[-1] == [[BOS, X, X, B]]  # context ids + continuation ids, minus the last
    assert merged.logprob == pytest.approx(math.log(1 / (VOCAB + 1)), abs=1e-6)  # P(c | b); "a" unscored
    assert merged.tokens == 1 and merged.bytes == 2
    with pytest.raises(FidelError, match="no tokens of its own"):
        continuation_logprobs(model, tok, ["xb"], ["a"])


def test_too_long_sequences_lose_tokens_from_the_left():
    model, tok = Bigram(max_length=4), CharTokenizer()
    (score,) = continuation_logprobs(model, tok, ["xxxxa"], ["c"])
    assert model.inputs[-1] == [[X, X, X, A]]  # [BOS x x x x a c][-5:][:-1]
    assert score.logprob == pytest.approx(math.log(0.5), abs=1e-6)
    with pytest.raises(FidelError, match="more than the context of 4"):
        continuation_logprobs(model, tok, ["x"], ["ccccc"])
    with pytest.raises(FidelError, match="2 contexts but 1 continuations"):
        continuation_logprobs(model, tok, ["x", "x"], ["c"])


def test_score_choices_raw_and_per_character_argmax_differ_by_hand():
    # after "a": "b" = log 0.3 (-1.20), "cc" = log 0.25 (-1.39); per character "cc" = -0.69 wins
    scores = score_choices(Bigram(), CharTokenizer(), ["xa", "xa"], ["b", "cc"], target_delimiter="")
    assert scores.raw == [0, 0] and scores.norm == [1, 1]
    assert scores.logprobs[0] == pytest.approx([math.log(0.3), math.log(0.25)], abs=1e-6)


# ---------------------------------------------------------------------------------------------- data


def test_sib200_splits_on_the_real_data():
    splits = load_sib200()
    assert {split: len(examples) for split, examples in splits.items()} == {
        "train": 701,
        "dev": 99,
        "test": 204,
    }
    labels = set(load_choice_task(SIB_TASK).labels)
    assert len(labels) == 7
    assert {example.label for examples in splits.values() for example in examples} == labels
    first = splits["test"][0]
    assert first.where.endswith("sib200/amh_Ethi/test.tsv:2") and first.label == "science/technology"


def _sib_dir(root: Path, test_rows: list[str], compress: bool = False) -> Path:
    folder = root / "sib200" / "amh_Ethi"
    folder.mkdir(parents=True)
    good = "index_id\tcategory\ttext\n1\thealth\tጤና ይስጥልኝ\n2\tsports\tእግር ኳስ\n"
    for split, text in (
        ("train", good),
        ("dev", good),
        ("test", "index_id\tcategory\ttext\n" + "".join(test_rows)),
    ):
        if compress:
            (folder / f"{split}.tsv.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
        else:
            (folder / f"{split}.tsv").write_text(text, encoding="utf-8")
    return root


def test_malformed_sib_rows_name_file_and_line(tmp_path: Path):
    bad_columns = _sib_dir(tmp_path / "columns", ["1\thealth\tጤና\n", "2\tsports\n"])
    with pytest.raises(FidelError, match=r"test\.tsv:3: bad_row: 2 fields, the header has 3"):
        load_sib200(bad_columns)
    bad_label = _sib_dir(tmp_path / "label", ["1\tweather\tዝናብ\n"])
    with pytest.raises(FidelError, match=r"test\.tsv:2: field 'category': 'weather' is not one of"):
        load_sib200(bad_label)
    compressed = _sib_dir(tmp_path / "zst", ["1\thealth\tጤና\n", "2\ttravel\tጉዞ\n"], compress=True)
    assert [e.label for e in load_sib200(compressed)["test"]] == ["health", "travel"]


def test_lm_eval_task_files_hold_the_data_and_our_prompt(tmp_path: Path):
    out = write_lmeval_tasks(None, tmp_path / "tasks")
    counts = {
        SIB_TASK: {"train": 701, "dev": 99, "test": 204},
        AFRISENTI_TASK: {"train": 5984, "dev": 1497, "test": 1999},
    }
    for name, expected in counts.items():
        task = load_choice_task(name)
        written = yaml.load((out / f"{name}.yaml").read_text(encoding="utf-8"), Loader=TaskYamlLoader)
        assert written["doc_to_text"] == task.template and written["doc_to_choice"] == list(task.choices)
        for split, path in written["dataset_kwargs"]["data_files"].items():
            assert Path(path).is_absolute() and Path(path).parent == out
            docs = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
            assert len(docs) == expected[split]
            assert all(doc["gold"] == task.labels.index(doc["label"]) for doc in docs)
    afrisenti = yaml.load((out / f"{AFRISENTI_TASK}.yaml").read_text(encoding="utf-8"), Loader=TaskYamlLoader)
    aggregation = afrisenti["metric_list"][-1]["aggregation"]  # written back as a !function tag
    assert isinstance(aggregation, FunctionRef) and aggregation == "fidel_metrics.macro_f1"
    assert (out / "fidel_metrics.py").is_file()


# ---------------------------------------------------------------------------------------------- k-shot


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE trained on the real FLORES-200 Amharic dev set (as in test_export_hf)."""
    lines = (resolve_data_dir() / "flores200" / "amh_Ethi.dev").read_text(encoding="utf-8").splitlines()
    directory = tmp_path_factory.mktemp("tokenizer")
    train_bpe(lines, 768, show_progress=False).save(directory)
    return directory


def _needed(tok: BPETokenizer, prompt: str, choices: tuple[str, ...]) -> int:
    return max(sum(map(len, encode_pair(tok, prompt, " " + choice))) - 1 for choice in choices)


def test_k_shot_prompts_are_seeded_and_fit_the_context(tokenizer_dir: Path):
    tok, task, splits = BPETokenizer.load(tokenizer_dir), load_choice_task(SIB_TASK), load_sib200()
    items, train = splits["test"][:5], splits["train"]
    prompts, kept = build_prompts(task, tok, items, train, 3, seed=7, max_length=4096)
    assert kept == [3] * 5
    assert build_prompts(task, tok, items, train, 3, seed=7, max_length=4096)[0] == prompts
    assert build_prompts(task, tok, items, train, 3, seed=8, max_length=4096)[0] != prompts
    # one Random(seed) draws each item's demonstrations in turn (lm-eval's default sampler)
    rng = random.Random(7)
    for item, prompt in zip(items, prompts, strict=True):
        demos = [task.demonstration(train[i]) for i in rng.sample(range(len(train)), 3)]
        assert prompt == "".join(demos) + task.prompt(item)
    assert task.demonstration(train[0]) == train[0].text + "\nርዕሰ ጉዳይ: ጂኦግራፊ\n\n"
    # a context that holds two demonstrations: the earliest one is dropped, the query stays whole
    rng = random.Random(7)
    first = [task.demonstration(train[i]) for i in rng.sample(range(len(train)), 3)]
    limit = _needed(tok, "".join(first[1:]) + task.prompt(items[0]), task.choices)
    (cut,), (n_kept,) = build_prompts(task, tok, items[:1], train, 3, seed=7, max_length=limit)
    assert n_kept == 2 and cut == "".join(first[1:]) + task.prompt(items[0])
    alone = _needed(tok, task.prompt(items[0]), task.choices)
    with pytest.raises(FidelError, match=rf"test\.tsv:2: the prompt needs {alone} tokens .* never truncated"):
        build_prompts(task, tok, items[:1], train, 3, seed=7, max_length=alone - 1)


# ---------------------------------------------------------------------------------------------- lm-eval


@pytest.fixture(scope="module")
def exported(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A random tiny Llama over the small BPE (context 1024 fits 2-shot prompts), exported in float32."""
    config = gqa_config(vocab_size=768, num_hidden_layers=2, max_position_embeddings=1024)
    model = random_llama(config, seed=3)
    hf_dir = export_hf(model, config, tokenizer_dir, tmp_path_factory.mktemp("hf"), dtype="float32")
    return model, BPETokenizer.load(tokenizer_dir), hf_dir


def test_batching_does_not_change_scores(exported):
    model, tok, _ = exported
    task, items = load_choice_task(SIB_TASK), load_sib200()["test"][:4]
    contexts = [task.prompt(item) for item in items for _ in task.choices]
    continuations = [" " + choice for _ in items for choice in task.choices]
    alone = continuation_logprobs(model, tok, contexts, continuations, batch_size=1)
    batched = continuation_logprobs(model, tok, contexts, continuations, batch_size=5)
    assert [s.logprob for s in batched] == pytest.approx([s.logprob for s in alone], abs=1e-4)
    assert [s.tokens for s in batched] == [s.tokens for s in alone]


class Recording(WrappedLM):
    """The real model, recording the shape of every input it is given."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__(inner)
        self.shapes: list[tuple[int, int]] = []

    def adjust(self, input_ids: torch.Tensor, cache: Any, output: Any) -> Any:
        self.shapes.append(tuple(input_ids.shape))
        return output


def test_choices_continue_from_one_pass_over_their_shared_context():
    config = gqa_config(vocab_size=64, num_hidden_layers=2, max_position_embeddings=24)
    inner = random_llama(config, seed=5).eval()
    model = Recording(inner)
    generator = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(2, 64, (n,), generator=generator).tolist()

    # two items of 3 choices (1- to 3-token continuations), one lone pair, one item too long to share
    lengths = {"p": (9, [1, 3, 2]), "q": (4, [2, 1, 3]), "r": (6, [2]), "s": (20, [3, 5])}
    pairs = [(name, [0, *ids(n)]) for name, (n, _) in lengths.items()]
    pairs = [(name, context, ids(k)) for name, context in pairs for k in lengths[name][1]]
    table = {name: context for name, context, _ in pairs}  # text -> ids (BOS included)
    table |= {f"{name}#{k}": context + x for k, (name, context, x) in enumerate(pairs)}
    encode_batch = lambda texts, add_bos=False: [table[text] for text in texts]  # noqa: E731
    tok = SimpleNamespace(bos_id=0, pad_id=1, encode_batch=encode_batch)
    contexts, continuations = [name for name, _, _ in pairs], [f"#{k}" for k in range(len(pairs))]
    scores = continuation_logprobs(model, tok, contexts, continuations)
    for score, (_, context, continuation) in zip(scores, pairs, strict=True):
        row = (context + continuation)[-25:]
        with torch.no_grad():
            logprobs = torch.log_softmax(inner(torch.tensor([row[:-1]])).logits[0], dim=-1)
        expected = logprobs[-len(continuation) :].gather(1, torch.tensor(continuation)[:, None]).sum()
        assert score.logprob == pytest.approx(float(expected), abs=1e-5)
        assert score.tokens == len(continuation)
    # p and q: one context pass (2 rows) and one pass of their 6 continuations (longest 3 - 1 tokens);
    # r (one choice) and s (one choice left once the other is truncated: 21 + 5 > 25) go through whole
    assert model.shapes == [(2, 10), (6, 2), (3, 24)]


LIMIT = 6


@pytest.mark.parametrize("shots", [0, 2])
def test_lm_eval_agrees_with_our_scorer(
    shots: int, exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model, tok, hf_dir = exported
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    tasks_dir = write_lmeval_tasks(None, tmp_path / "tasks")
    theirs = run_lm_eval(hf_dir, tasks_dir, limit=LIMIT, num_fewshot=shots, seed=11, log_samples=True)
    ours = {
        SIB_TASK: evaluate_sib(model, tok, shots=shots, seed=11, limit=LIMIT),
        AFRISENTI_TASK: evaluate_afrisenti_likelihood(model, tok, limit=LIMIT)
        if shots == 0
        else evaluate_choice_task(AFRISENTI_TASK, model, tok, shots=shots, seed=11, limit=LIMIT),
    }
    for name, result in ours.items():
        scores = theirs["results"][name]
        assert result.n == LIMIT and result.details["shots"] == shots
        assert result.details["acc"] == scores["acc,none"]
        assert result.details["acc_norm"] == scores["acc_norm,none"]
        if name == AFRISENTI_TASK:
            assert result.details["macro_f1"] == pytest.approx(scores["f1,none"], abs=1e-12)
        # the same (context, continuation) pairs, and the same log-likelihood of each
        task, splits = load_choice_task(name), task_splits(name)
        prompts, _ = build_prompts(task, tok, splits["test"][:LIMIT], splits["train"], shots, 11, 1024)
        samples = sorted(theirs["samples"][name], key=lambda sample: sample["doc_id"])
        pairs = [tuple(args) for sample in samples for args in sample["arguments"]]
        assert pairs == [(p, " " + choice) for p in prompts for choice in task.choices]
        mine = continuation_logprobs(model, tok, [p for p, _ in pairs], [c for _, c in pairs])
        lm_eval_logprobs = [resp[0][0] for sample in samples for resp in sample["resps"]]
        assert [s.logprob for s in mine] == pytest.approx(lm_eval_logprobs, rel=1e-6, abs=1e-5)
        per_label = result.details["per_label"]
        assert sum(counts["gold"] for counts in per_label.values()) == LIMIT
        assert sum(counts["correct"] for counts in per_label.values()) == round(scores["acc,none"] * LIMIT)
