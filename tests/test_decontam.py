"""Tests for decontamination against the real evaluation sets: planted eval text is found (also respelled),
clean text is untouched, whole documents go when mostly eval text, and the counters add up."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document

from fidellm.data.amharic import HOMOPHONES, match_key, words
from fidellm.data.decontam import Decontaminate, EvalNgramIndex
from fidellm.data.registry import load_registry
from fidellm.data.sources import iter_documents, iter_eval_units
from fidellm.errors import FidelError
from fidellm.paths import resolve_data_dir

SETS = ["flores200", "sib200", "afrisenti_amh"]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return resolve_data_dir()


@pytest.fixture(scope="module")
def units(data_dir):
    return list(iter_eval_units(data_dir, SETS))


@pytest.fixture(scope="module")
def index(units) -> EvalNgramIndex:
    return EvalNgramIndex.build(units, n=8)


@pytest.fixture(scope="module")
def clean_docs(data_dir) -> list[Document]:
    """Real BBC Amharic articles (measured: none shares text with the default eval sets)."""
    docs = iter_documents(load_registry()["bbc_amharic_scitech"], data_dir)
    return [d for d, _ in zip((d for d in docs if isinstance(d, Document)), range(40), strict=False)]


def _flores_only(units) -> list[str]:
    """FLORES lines that are not also SIB-200 sentences (SIB-200 is a subset of FLORES)."""
    sib = {match_key(u.text) for u in units if u.set_name == "sib200"}
    return [u.text for u in units if u.set_name == "flores200" and match_key(u.text) not in sib]


def _stat(step: Decontaminate, key: str) -> int:
    value = step.stats.to_dict()["stats"].get(key, 0)
    return value["total"] if isinstance(value, dict) else value


def _run(step: Decontaminate, docs: list[Document]) -> list[Document]:
    return list(step.run(iter(docs)))


def _copy(doc: Document, text: str | None = None) -> Document:
    return Document(text=doc.text if text is None else text, id=doc.id, metadata=dict(doc.metadata))


def test_index_shape(index, units):
    assert index.set_names == tuple(SETS)
    per_set = Counter(u.set_name for u in units)
    ngram_units = Counter(index.set_names[s] for s in index.unit_sets)
    for name in SETS:  # every unit is indexed by n-grams, matched whole, or counted as skipped
        assert (
            ngram_units[name] + index.short_units.get(name, 0) + index.skipped_units.get(name, 0)
            == per_set[name]
        )
    assert index.short_units["afrisenti_amh"] > 0 and index.skipped_units["afrisenti_amh"] > 0
    assert "afrisenti_amh: " in index.summary() and "too short to match" in index.summary()
    assert len(index.unit_ngrams) == len(index.unit_ids) and len(index.ngrams) == index.unit_ngrams.sum()
    assert np.all(np.diff(index.ngrams.astype(np.float64)) >= 0)
    assert index.nbytes < 20_000_000


def test_planted_flores_line_removed_and_only_it(index, units, clean_docs):
    flores = _flores_only(units)[5]
    doc = clean_docs[0]
    lines = doc.text.split("\n")
    planted = _copy(doc, "\n".join([*lines[:2], flores, *lines[2:]]))
    out = _run(Decontaminate(index=index), [planted])
    assert len(out) == 1
    assert out[0].text == doc.text
    assert out[0].metadata["decontam_lines"] == 1
    assert out[0].metadata["decontam_sets"] == {"flores200": 1}


def _respell(text: str) -> str:
    """Other punctuation and spacing, and the ሀ/ሰ series written with their homophones ሐ/ሠ."""
    inverse = {}
    for source, target in HOMOPHONES.items():
        inverse.setdefault(target, source)
    text = text.replace("።", " ::").replace("፣", " ,").replace(" ", "  ")
    return "".join(inverse.get(ch, ch) if ch in "ሀሁሂሃሄህሆሰሱሲሳሴስሶ" else ch for ch in text)


def test_respelled_flores_line_still_caught(index, units, clean_docs):
    flores = next(t for t in _flores_only(units) if "ሀ" in t and "ሰ" in t)
    respelled = _respell(flores)
    assert respelled != flores and match_key(respelled) == match_key(flores)
    doc = clean_docs[1]
    out = _run(Decontaminate(index=index), [_copy(doc, doc.text + "\n" + respelled)])
    assert out[0].text == doc.text
    assert out[0].metadata["decontam_sets"] == {"flores200": 1}


def test_flores_sentence_inside_a_paragraph_removes_that_paragraph(index, units, clean_docs):
    flores = _flores_only(units)[40]
    doc = clean_docs[2]
    lines = doc.text.split("\n")
    lines[1] = lines[1] + " " + flores
    out = _run(Decontaminate(index=index), [_copy(doc, "\n".join(lines))])
    assert out[0].text.split("\n") == lines[:1] + lines[2:]


def test_short_afrisenti_tweet_caught(index, units, clean_docs):
    tweet = next(u.text for u in units if u.set_name == "afrisenti_amh" and len(words(match_key(u.text))) < 8
                 and len(match_key(u.text)) >= 40)  # fmt: skip
    doc = clean_docs[3]
    out = _run(Decontaminate(index=index), [_copy(doc, doc.text + "\n" + tweet)])
    assert out[0].text == doc.text
    assert out[0].metadata["decontam_sets"] == {"afrisenti_amh": 1}


def test_lines_of_a_batch_are_matched_alone(index, units, clean_docs):
    """Looking lines up together gives each its own mask: eval words split over two lines match neither."""
    flores = next(u.text for u in units if u.set_name == "flores200" and len(words(match_key(u.text))) >= 18)
    ws = words(match_key(flores))
    halves = [" ".join(ws[:9]), " ".join(ws[9:18])]  # 2 of the unit's n-grams each; 3 are needed
    assert index.match_mask(" ".join(halves)) != 0
    lines = [*clean_docs[4].text.split("\n"), *halves, flores, "  "]
    masks = index.line_masks(lines)
    assert masks == [index.match_mask(line) for line in lines]
    assert masks[-4:-2] == [0, 0] and masks[-2] != 0 and masks[-1] == 0


def test_clean_text_untouched(index, clean_docs):
    docs = [_copy(d) for d in clean_docs]
    out = _run(Decontaminate(index=index), docs)
    assert [d.text for d in out] == [d.text for d in clean_docs]
    assert not any("decontam_lines" in d.metadata for d in out)


def test_formulaic_phrase_alone_is_not_contamination(index, units):
    """One shared 8-gram of a long unit (a title, a name) is not enough; a run of ~10 words is."""
    flores = _flores_only(units)
    long_line = next(t for t in flores if len(words(match_key(t))) >= 20)
    ws = words(match_key(long_line))
    assert index.match(" ".join(ws[:8]) + " ለምሳሌ ይህ ሌላ ጽሑፍ ነው የሚል አዲስ ሐረግ ተጨመረ") == []
    assert index.match(" ".join(ws[:10])) == ["flores200"]


def test_number_runs_do_not_match():
    numbers = EvalNgramIndex.build([_unit("x", "1 2 3 4 5 6 7 8 9 10 11 12 ሰላም")], n=8)
    assert numbers.match("1 2 3 4 5 6 7 8 9 10 11 12") == []


def _unit(set_name: str, text: str, i: int = 0):
    from fidellm.data.registry import EvalUnit

    return EvalUnit(set_name, f"{set_name}/test:{i}", text)


def test_mostly_eval_document_dropped_whole(index, units, clean_docs):
    flores = _flores_only(units)[100:105]
    doc = _copy(clean_docs[4], "\n".join([*flores, "አጭር መስመር ነው።"]))
    step = Decontaminate(index=index, max_contaminated_fraction=0.5)
    assert _run(step, [doc]) == []
    assert _stat(step, "dropped_contaminated") == 1
    assert _stat(step, "decontam_lines_flores200") == 5 and _stat(step, "decontam_docs_flores200") == 1
    assert doc.text.startswith(flores[0])  # dropped documents keep their text for the exclusion writer


def test_all_lines_contaminated_dropped_even_with_fraction_one(index, units, clean_docs):
    flores = _flores_only(units)[200]
    step = Decontaminate(index=index, max_contaminated_fraction=1.0)
    assert _run(step, [_copy(clean_docs[5], flores)]) == []


def test_counts_per_set_add_up(index, units, clean_docs):
    flores_only = _flores_only(units)
    sib_sentence = next(u.text for u in units if u.set_name == "sib200")  # also a FLORES line
    tweets = [u.text for u in units if u.set_name == "afrisenti_amh" and len(match_key(u.text)) > 60]
    planted = [
        [flores_only[1], tweets[0]],
        [sib_sentence],
        [tweets[1], tweets[2], flores_only[2]],
        [],
    ]
    docs = [
        _copy(d, d.text + "".join("\n" + p for p in extra))
        for d, extra in zip(clean_docs[6:10], planted, strict=True)
    ]
    step = Decontaminate(index=index, max_contaminated_fraction=1.0)
    out = _run(step, docs)
    assert len(out) == 4
    per_doc = Counter()
    docs_per_set = Counter()
    for doc in out:
        for name, n in doc.metadata.get("decontam_sets", {}).items():
            per_doc[name] += n
            docs_per_set[name] += 1
    assert per_doc == Counter(flores200=3, sib200=1, afrisenti_amh=3)
    assert docs_per_set == Counter(flores200=3, sib200=1, afrisenti_amh=2)  # the SIB line is a FLORES line
    assert all(_stat(step, f"decontam_lines_{k}") == v for k, v in per_doc.items())
    assert all(_stat(step, f"decontam_docs_{k}") == v for k, v in docs_per_set.items())
    removed = sum(d.metadata.get("decontam_lines", 0) for d in out)
    assert _stat(step, "decontam_lines") == removed == sum(len(p) for p in planted)
    assert [d.text for d in out] == [d.text for d in clean_docs[6:10]]


def test_hashes_are_deterministic_across_processes():
    texts = ["ኢትዮጵያ ውስጥ ያሉ ሰዎች በጣም ብዙ ናቸው ሲሉ ገለጹ", "ሰላም ለሁላችሁ ይሁን"]
    code = (
        "from fidellm.data.decontam import EvalNgramIndex, key_hash;"
        "from fidellm.data.registry import EvalUnit;"
        f"index = EvalNgramIndex.build([EvalUnit('s', str(i), t) for i, t in enumerate({texts!r})]);"
        "print(list(map(int, index.ngrams)), key_hash('ሰላም ለሁላችሁ'))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""})  # fmt: skip
    from fidellm.data.decontam import key_hash
    from fidellm.data.registry import EvalUnit

    index = EvalNgramIndex.build([EvalUnit("s", str(i), t) for i, t in enumerate(texts)])
    assert len(index.ngrams) == 2 and index.vocab["ኢትዮጵያ"] == 1
    assert other.stdout.strip() == f"{list(map(int, index.ngrams))} {key_hash('ሰላም ለሁላችሁ')}"


def test_step_pickles_without_index_and_rebuilds_lazily(data_dir, units):
    step = Decontaminate(data_dir=data_dir, sets=["flores200"])
    flores = next(u.text for u in units if u.set_name == "flores200")
    assert step.index.set_names == ("flores200",)
    clone = pickle.loads(pickle.dumps(step))
    assert len(pickle.dumps(step)) < 100_000
    assert clone.index is step.index  # same process: the cached index is reused
    assert clone.filter(Document(text=flores, id="x")) == (False, "contaminated")


def test_bad_arguments(data_dir):
    with pytest.raises(FidelError):
        Decontaminate()
    with pytest.raises(FidelError):
        Decontaminate(data_dir=data_dir, max_contaminated_fraction=2)
    with pytest.raises(FidelError):
        EvalNgramIndex.from_data_dir(data_dir, sets=["no_such_set"])
    with pytest.raises(FidelError):
        EvalNgramIndex.build([], n=0)


@pytest.mark.slow
def test_known_overlaps_in_real_pretraining_text(data_dir):
    """MANIFEST D: the Bible overlaps AfriSenti tweets quoting verses; wiki 2015 overlaps AmQA contexts."""
    registry = load_registry()
    step = Decontaminate(index=EvalNgramIndex.from_data_dir(data_dir, ["afrisenti_amh", "amqa"]))
    found = Counter()
    for name in ("amharic_bible_wordproject", "amwiki_2015_dennis_sell"):
        for doc in iter_documents(registry[name], data_dir):
            if isinstance(doc, Document):
                step.filter(doc)
                for eval_set, n in doc.metadata.get("decontam_sets", {}).items():
                    found[name, eval_set] += n
    assert found["amharic_bible_wordproject", "afrisenti_amh"] >= 30
    assert found["amwiki_2015_dennis_sell", "amqa"] >= 100
    assert found["amharic_bible_wordproject", "amqa"] == 0


def test_eval_sets_of_the_run_s_user_registry_decontaminate_too(tmp_path):
    """An extra registry entry with `section: eval` is an evaluation set like the packaged ones: named in
    decontam.sets it used to be 'unknown', and left out of the default sets it was never checked."""
    from fidellm.data.config import PrepareConfig
    from fidellm.data.pipeline import PrepareLayout, build_stages

    line = "የእግር ኳስ ፌዴሬሽንና ቅዱስ ጊዮርጊስ ክለብ ዛሬ ረፋድ ላይ በሰጡት መግለጫ ተስማሙ።"
    (tmp_path / "myeval.txt").write_text(line + "\n", encoding="utf-8")
    registry = tmp_path / "mine.yaml"
    registry.write_text(
        "sources:\n  - {name: my_eval, section: eval, paths: {test: myeval.txt}, format: txt,"
        " license: CC0, license_family: open}\n",
        encoding="utf-8",
    )
    step = Decontaminate(data_dir=tmp_path, sets=["my_eval"], extra_registry=registry)
    assert step.filter(Document(text=f"ሰላም ለሁላችሁ።\n{line}", id="d")) == (False, "contaminated")
    config = PrepareConfig()
    config.sources.extra_registry = str(registry)
    stages = build_stages(PrepareLayout(tmp_path / "run"), tmp_path, [], config)
    (wired,) = [
        s
        for stage in stages
        if stage.name == "filter"
        for s in stage.pipeline
        if isinstance(s, Decontaminate)
    ]
    assert wired.extra_registry == str(registry)
