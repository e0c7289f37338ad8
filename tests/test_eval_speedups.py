"""The faster paths of the evaluation give what the one-at-a-time paths gave: batched label encoding
(`encode_pairs`, `build_prompts`) the ids of `encode_pair` text by text, the single-pass gzip and the one
compressor pool the sizes of separate calls; and a base-model eval leaves the chat code (sacrebleu…)
unloaded, the report card torch."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from fidellm.errors import FidelError
from fidellm.eval.baselines import COMPRESSORS, compressed_bits_per_char_runs, compressor_results
from fidellm.eval.downstream.likelihood import encode_pairs
from fidellm.eval.downstream.sib import SIB_TASK, build_prompts, load_choice_task
from fidellm.eval.downstream.tasks import TextExample
from fidellm.tokenizer.bpe import BPETokenizer, train_bpe

AMHARIC = "ኢትዮጵያ በምሥራቅ አፍሪካ የምትገኝ አገር ናት። ቡና ጣፋጭ ነው። ሰላም ለሁሉም ይሁን። "


def encode_pair_alone(tok: BPETokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The lm-eval pair rule, one text per tokenizer call (the implementation before `encode_pairs`)."""
    if context == "":
        ids = tok.encode(continuation)
        return ([tok.bos_id], ids) if ids[:1] != [tok.bos_id] else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tok.encode(context, add_bos=True)
    whole = tok.encode(context + continuation, add_bos=True)
    return context_ids, whole[len(context_ids) :]


class CountingTokenizer(BPETokenizer):
    """A BPE tokenizer that counts its tokenizer calls."""

    calls = 0

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        type(self).calls += 1
        return super().encode(text, add_bos)

    def encode_batch(self, texts, add_bos: bool = False) -> list[list[int]]:
        type(self).calls += 1
        return super().encode_batch(texts, add_bos)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BPETokenizer:
    directory = tmp_path_factory.mktemp("tokenizer")
    train_bpe([AMHARIC * 3, "the cat sat on the mat. " * 5], 512, show_progress=False).save(directory)
    return CountingTokenizer.load(directory)


def test_batched_pairs_are_the_pairs_encoded_one_by_one(tokenizer: BPETokenizer):
    contexts = ["", "   ", "ቡና ጣፋጭ\n", "ቡና ጣፋጭ\n", "ኢትዮጵያ በምሥራቅ ", "the ca", "the ca", "\n\n"]
    continuations = ["ሰላም", " ቡና", "ነው", " ነው።", "አፍሪካ", "t sat", "ts", "x"]
    CountingTokenizer.calls = 0
    batched = encode_pairs(tokenizer, contexts, continuations)
    assert CountingTokenizer.calls == 3  # distinct contexts, whole texts, empty-context continuations
    alone = [encode_pair_alone(tokenizer, c, x) for c, x in zip(contexts, continuations, strict=True)]
    assert batched == alone


def build_prompts_alone(task, tok, items, train, shots, seed, max_length) -> tuple[list[str], list[int]]:
    """`build_prompts` as it was: item by item, every label encoded alone, one demonstration fewer a try."""
    rng = random.Random(seed)
    prompts, kept = [], []
    for item in items:
        demos = [task.demonstration(example) for example in rng.sample(train, shots)]
        query = task.prompt(item)
        for keep in range(len(demos), -1, -1):
            prompt = "".join(demos[len(demos) - keep :]) + query
            needed = max(
                sum(map(len, encode_pair_alone(tok, prompt, task.target_delimiter + choice))) - 1
                for choice in task.choices
            )
            if needed <= max_length:
                break
        else:
            raise FidelError(f"{item.where}: needs {needed}")
        prompts.append(prompt)
        kept.append(keep)
    return prompts, kept


def test_batched_prompt_building_keeps_the_same_demonstrations(tokenizer: BPETokenizer):
    task = load_choice_task(SIB_TASK)
    rng = random.Random(0)
    words = AMHARIC.split()
    examples = [
        TextExample(" ".join(rng.choices(words, k=rng.randint(2, 30))), rng.choice(task.labels), f"t:{i}")
        for i in range(40)
    ]
    items, train = examples[:12], examples[12:]
    lengths = [len(tokenizer.encode(task.prompt(item), add_bos=True)) for item in items]
    for shots, max_length in ((0, 4096), (3, 4096), (5, 160), (5, max(lengths) + 40)):
        before = build_prompts_alone(task, tokenizer, items, train, shots, 11, max_length)
        assert build_prompts(task, tokenizer, items, train, shots, 11, max_length) == before, shots
    assert any(k < 5 for k in build_prompts(task, tokenizer, items, train, 5, 11, 160)[1])  # drops happened
    with pytest.raises(FidelError, match="t:"):
        build_prompts(task, tokenizer, items, train, 2, 11, 8)


def test_one_pool_and_forked_gzip_give_the_sizes_of_separate_calls():
    rng = random.Random(3)
    words = [*AMHARIC.split(), "ቤት", "ውሃ", "ልጅ", "መጽሐፍ"]
    text = " ".join(rng.choices(words, k=3000))
    context = " ".join(rng.choices(words, k=20000))
    data, primer = text.encode(), context.encode()
    expected = [
        {name: 8.0 * len(compress(data)) / len(text) for name, compress in COMPRESSORS.items()},
        {
            name: 8.0 * (len(compress(primer + data)) - len(compress(primer))) / len(text)
            for name, compress in COMPRESSORS.items()
        },
    ]
    assert compressed_bits_per_char_runs(text, ["", context]) == expected
    results = {r.task: r.value for r in compressor_results(text, context)}
    assert results["flores/gzip"] == expected[0]["gzip"] and results["flores/xz+train"] == expected[1]["xz"]
    assert {r.task for r in compressor_results(text, "")} == {f"flores/{name}" for name in COMPRESSORS}


def imported_after(code: str) -> set[str]:
    """Top-level package names in sys.modules after running `code` in a fresh interpreter."""
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_base_model_tasks_leave_the_chat_code_unloaded():
    loaded = imported_after(
        "from fidellm.eval.cli import DEFAULT_TASKS\n"
        "from fidellm.eval.suite import all_tasks, expand_groups\n"
        "names = expand_groups(DEFAULT_TASKS.split(','))\n"
        "assert set(names) <= set(all_tasks(names)), names\n"
        "import fidellm.eval.chat_data\n"
        "assert 'fidellm.eval.chat' not in sys.modules"
    )
    assert "sacrebleu" not in loaded


def test_the_report_card_needs_no_torch():
    assert "torch" not in imported_after("import fidellm.eval.report, fidellm.eval.results")
