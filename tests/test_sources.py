"""The source registry: validation, user registries, document/rejection accounting, sharding, licence
selection, evaluation units — on fixtures and on the real shared data."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest
from datatrove.data import Document

from fidellm.data.readers import Rejection
from fidellm.data.registry import LICENCE_FAMILIES, SECTIONS, licence_family_of, load_registry, select_sources
from fidellm.data.sources import (
    iter_documents,
    iter_eval_units,
    source_files,
)
from fidellm.errors import FidelError
from fidellm.paths import resolve_data_dir

FIX = Path(__file__).parent / "fixtures" / "readers"
USER = FIX / "user_sources.yaml"
PRETRAIN = [
    "enh_corpus", "geez_ebooks_amharic", "amharic_bible_wordproject", "amwiki_2015_dennis_sell",
    "alain_am_2024", "ena_am_2022_2023", "bbc_amharic_scitech", "nlpta_web_am_2025",
    "amharic_hatespeech_tweets", "uhh_amharic_social_questions", "amharic_fb_comments",
    "african_storybook_am",
]  # fmt: skip
EVAL = ["flores200", "sib200", "masakhanews_amh", "ntrex128", "mafand_mt_en_amh", "masakhaner_amh",
        "afrisenti_amh", "amqa"]  # fmt: skip
METADATA_KEYS = {"source", "orig_id", "date", "license", "license_family", "weight"}


@pytest.fixture(scope="module")
def user_registry():
    return load_registry(USER)


def split(items):
    docs = [i for i in items if isinstance(i, Document)]
    rejected = [i for i in items if isinstance(i, Rejection)]
    assert len(docs) + len(rejected) == len(items)
    return docs, rejected


def read_all(spec, data_dir, rank=0, world_size=1):
    return split(list(iter_documents(spec, data_dir, rank, world_size)))


# ---------------------------------------------------------------------------------------------- registry


def test_packaged_registry_is_complete_and_consistent():
    registry = load_registry()
    assert [n for n in registry if registry[n].section == "pretrain"] == PRETRAIN
    assert set(EVAL) <= {n for n, s in registry.items() if s.section == "eval" and s.default}
    assert {"marspanther_am_en_parallel", "gezmu_am_en_parallel_v1"} <= {
        n for n, s in registry.items() if s.section == "parallel"
    }
    for spec in registry.values():
        assert spec.section in SECTIONS and spec.license_family in LICENCE_FAMILIES and spec.license
        assert spec.upstream_repo and len(spec.upstream_commit or "") == 40, spec.name
        assert spec.files, f"{spec.name}: no file hashes"
        for item in spec.files:
            url = spec.url_for(item)
            if spec.converted:
                assert url is None, f"{spec.name}: a converted source has no canonical URL"
            else:
                prefix = f"https://raw.githubusercontent.com/{spec.upstream_repo}/{spec.upstream_commit}/"
                assert url and url.startswith(prefix), item.path
    families = {n: registry[n].license_family for n in registry}
    assert families["enh_corpus"] == "open" and families["geez_ebooks_amharic"] == "open"
    assert families["masakhaner_amh"] == "noncommercial" and families["mafand_mt_en_amh"] == "noncommercial"
    assert families["ena_am_2022_2023"] == "unknown" and families["masakhanews_amh"] == "unknown"
    assert all(registry[n].converted for n in PRETRAIN if n != "amwiki_2015_dennis_sell")


def test_gezmu_url_quotes_spaces_and_unicode():
    spec = load_registry()["gezmu_am_en_parallel_v1"]
    url = spec.url_for(spec.files[0])
    assert " " not in url and "%E2%80%93" in url and "%20%281%29" in url


@pytest.mark.parametrize(
    "licence, family",
    [
        ("CC0 1.0 Universal", "open"),
        ("CC-BY", "open"),
        ("CC BY-SA 4.0", "open"),
        ("MIT", "open"),
        ("Apache 2.0", "open"),
        ("CC-BY-NC", "noncommercial"),
        ("CC BY-NC 4.0", "noncommercial"),
        ("research purposes only", "noncommercial"),
        ("(c) BBC, no licence stated", "unknown"),
        ("", "unknown"),
    ],
)
def test_licence_family_of(licence, family):
    assert licence_family_of(licence) == family


ENTRY = (
    "  - {name: x1, section: pretrain, paths: [a.jsonl], format: jsonl, license: MIT, license_family: open"
)


@pytest.mark.parametrize(
    "body, message",
    [
        (ENTRY + ", colour: red}", r"source 'x1' \(entry 0\), field 'colour': unknown field"),
        (ENTRY.replace("jsonl}", "jsonl").replace("format: jsonl", "format: xlsx") + "}",
         r"field 'format': 'xlsx' is not supported; supported formats: jsonl, json, txt, csv"),
        (ENTRY.replace(", license: MIT", "") + "}", r"field 'license': is required"),
        (ENTRY.replace("section: pretrain", "section: train") + "}",
         r"field 'section': 'train' is not one of"),
        (ENTRY + ", options: {delimiter: ';'}}",
         r"field 'options': option 'delimiter' does not apply to jsonl"),
        (ENTRY + ", weight: heavy}", r"field 'weight': must be int or float"),
        (ENTRY + ", unit: sentence}", r"field 'unit': 'sentence' is not one of file, paragraph, line"),
        (ENTRY + ", files: [{path: a.jsonl, sha256: abc}]}", r"field 'files': a.jsonl: sha256 must be 64"),
        ("  - [not, a, mapping]", r"entry 0, field '\(entry\)': must be a mapping"),
        ("  - {name: x1, section: pretrain, format: xml, paths: [a.xml], license: MIT, license_family: open}",
         r"field 'options': xml sources need record_tag"),
    ],
)  # fmt: skip
def test_registry_validation_names_file_entry_and_field(tmp_path, body, message):
    path = tmp_path / "mine.yaml"
    path.write_text("sources:\n" + body + "\n", encoding="utf-8")
    with pytest.raises(FidelError, match=message) as caught:
        load_registry(path)
    assert str(path) in str(caught.value)


def test_registry_file_level_errors(tmp_path):
    with pytest.raises(FidelError, match="does not exist"):
        load_registry(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [unclosed\n", encoding="utf-8")
    with pytest.raises(FidelError, match="not valid YAML"):
        load_registry(bad)
    bad.write_text("just: a mapping\n", encoding="utf-8")
    with pytest.raises(FidelError, match="top-level 'sources:' list"):
        load_registry(bad)
    bad.write_text(
        ENTRY.replace("x1", "enh_corpus").replace("  - ", "sources:\n  - ") + "}\n", encoding="utf-8"
    )
    with pytest.raises(FidelError, match=r"'enh_corpus' is already defined in fidellm/data/sources\.yaml"):
        load_registry(bad)


def test_a_directory_where_the_registry_expects_files_is_named(tmp_path):
    registry_file = tmp_path / "dirs.yaml"
    registry_file.write_text(
        "sources:\n  - {name: fx_dir, section: pretrain, paths: [corpus], format: jsonl, license: MIT,"
        " license_family: open}\n",
        encoding="utf-8",
    )
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text('{"text": "ሰላም"}\n', encoding="utf-8")
    with pytest.raises(FidelError) as caught:
        source_files(load_registry(registry_file)["fx_dir"], tmp_path)
    assert str(caught.value) == (
        f"source 'fx_dir' ({registry_file}): path 'corpus' names a directory ({tmp_path / 'corpus'}),"
        " expected jsonl files: list the files, or a glob such as 'corpus/*.jsonl'"
    )
    with pytest.raises(FidelError, match=r"sources file .*corpus is a directory, expected a YAML file"):
        load_registry(tmp_path / "corpus")


# ---------------------------------------------------------------------------------------------- documents


def test_documents_carry_ids_and_metadata(user_registry, tmp_path):
    docs, rejected = read_all(user_registry["fx_good"], tmp_path)
    assert not rejected
    assert [d.id for d in docs] == ["fx_good/a", "fx_good/b", "fx_good/c"]
    assert all(set(d.metadata) == METADATA_KEYS for d in docs)
    first = docs[0].metadata
    assert first == {"source": "fx_good", "orig_id": "a", "date": "2024-01-02", "license": "CC BY 4.0",
                     "license_family": "open", "weight": 2.5}  # fmt: skip
    assert docs[1].metadata["date"] is None and docs[1].text == "ሁለተኛ ሰነድ\nሁለተኛ መስመር"


def test_bad_records_are_accounted_for(user_registry, tmp_path):
    docs, rejected = read_all(user_registry["fx_bad"], tmp_path)
    assert [d.metadata["orig_id"] for d in docs] == ["r1", "r8"]
    by_line = {r.line: (r.reason, r.detail) for r in rejected}
    assert by_line[2][0] == "invalid_json"
    assert by_line[3][0] == "invalid_utf8"
    assert by_line[4] == ("missing_field", "text field 'text' is missing")
    assert by_line[5] == ("bad_field_type", "text field 'text' is int, not a string")
    assert by_line[6][0] == "empty"
    assert by_line[7][0] == "not_an_object"
    assert by_line[10][0] == "removed_listed" and "removed.tsv" in by_line[10][1]
    assert by_line[11] == ("missing_field", "id field 'id' is missing")
    assert len(docs) + len(rejected) == 10  # 11 lines, one blank


def test_compressed_files_are_found_transparently(user_registry, tmp_path):
    expected = [d.text for d in read_all(user_registry["fx_good"], tmp_path)[0]]
    for name in ("fx_zst", "fx_gz"):
        assert [d.text for d in read_all(user_registry[name], tmp_path)[0]] == expected
    docs, _ = read_all(user_registry["fx_compressed_glob"], tmp_path)
    assert [d.metadata["orig_id"] for d in docs] == [
        f"{sub}/good.jsonl:{i}" for sub in ("gz", "zst") for i in range(3)
    ]


def test_data_dir_takes_precedence_over_yaml_dir(user_registry, tmp_path):
    (tmp_path / "good.jsonl").write_text(
        '{"id": "override", "text": "from the data dir"}\n', encoding="utf-8"
    )
    docs, _ = read_all(user_registry["fx_good"], tmp_path)
    assert [d.metadata["orig_id"] for d in docs] == ["override"]
    assert source_files(user_registry["fx_good"], tmp_path) == [tmp_path / "good.jsonl"]


def test_absolute_paths_in_user_registry(tmp_path):
    registry_file = tmp_path / "abs.yaml"
    registry_file.write_text(
        f"sources:\n  - {{name: fx_abs, section: pretrain, paths: ['{FIX / 'good.jsonl'}'], format: jsonl,"
        " id_field: id, license: MIT, license_family: open}\n",
        encoding="utf-8",
    )
    docs, _ = read_all(load_registry(registry_file)["fx_abs"], tmp_path / "elsewhere")
    assert len(docs) == 3


def test_missing_file_suggests_download(tmp_path):
    expected = (
        r"source 'flores200': flores200/amh_Ethi.dev not found in .*"
        r"fidellm data download --data-dir .* --sources flores200"
    )
    with pytest.raises(FidelError, match=expected):
        list(iter_eval_units(tmp_path, ["flores200"]))
    with pytest.raises(FidelError, match="converted; copy it from the shared data"):
        list(iter_documents(load_registry()["enh_corpus"], tmp_path))
    registry_file = tmp_path / "mine.yaml"  # one's own entry: its path is to check, nothing downloads
    registry_file.write_text(
        "sources:\n  - {name: fx_mine, section: pretrain, paths: [nowhere.jsonl], format: jsonl,"
        " license: MIT, license_family: open}\n",
        encoding="utf-8",
    )
    with pytest.raises(FidelError, match=f"check the entry's paths in {re.escape(str(registry_file))}"):
        list(iter_documents(load_registry(registry_file)["fx_mine"], tmp_path))


def test_txt_paragraph_ids_and_bad_utf8(user_registry, tmp_path):
    docs, rejected = read_all(user_registry["fx_paragraphs"], tmp_path)
    assert [d.metadata["orig_id"] for d in docs] == [
        "paragraphs.txt:1", "paragraphs.txt:5", "paragraphs.txt:9",
        "bad_paragraphs.txt:1", "bad_paragraphs.txt:6",
    ]  # fmt: skip
    assert [(Path(r.path).name, r.line, r.reason) for r in rejected] == [
        ("bad_paragraphs.txt", 3, "invalid_utf8")
    ]
    (whole,), _ = read_all(user_registry["fx_file"], tmp_path)
    assert whole.metadata["orig_id"] == "paragraphs.txt:0" and "\n\n" in whole.text


def test_tabular_and_xml_sources(user_registry, tmp_path):
    docs, rejected = read_all(user_registry["fx_tsv"], tmp_path)
    assert [d.metadata["orig_id"] for d in docs] == ["1", "2", "5"] and len(rejected) == 2
    docs, rejected = read_all(user_registry["fx_parquet"], tmp_path)
    assert [d.metadata["orig_id"] for d in docs] == ["p1", "p3"]
    assert [(r.line, r.reason, r.detail) for r in rejected] == [
        (2, "bad_field_type", "text field 'text' is null, not a string")
    ]
    docs, rejected = read_all(user_registry["fx_xml"], tmp_path)
    assert [d.text for d in docs] == ["ርዕስ\nየመጀመሪያ ሰነድ", "ሁለት", "ሦስት\nሦስተኛ ሰነድ"] and not rejected
    assert docs[0].metadata["date"] == "2020-01-01" and docs[0].id == "fx_xml/x1"
    docs, _ = read_all(user_registry["fx_csv"], tmp_path)
    assert docs[0].text == 'a, b and "c"'


def test_csv_source_missing_column_is_an_error(tmp_path):
    registry_file = tmp_path / "cols.yaml"
    registry_file.write_text(
        "sources:\n  - {name: fx_cols, section: pretrain, paths: [nocol.tsv], format: tsv, license: MIT,"
        " license_family: open}\n",
        encoding="utf-8",
    )
    (tmp_path / "nocol.tsv").write_bytes((FIX / "nocol.tsv").read_bytes())
    with pytest.raises(FidelError, match=r"nocol.tsv: column 'text' not found; columns: id, body"):
        list(iter_documents(load_registry(registry_file)["fx_cols"], tmp_path))


def test_grouping_verses_into_chapters(user_registry, tmp_path):
    docs, rejected = read_all(user_registry["fx_verses"], tmp_path)
    assert [(d.metadata["orig_id"], d.text) for d in docs] == [
        ("1/1", "በመጀመሪያ\nሦስተኛ"),
        ("1/2", "ሁለተኛ ምዕራፍ"),
        ("2/1", "ሌላ መጽሐፍ"),
    ]
    assert [(r.line, r.reason) for r in rejected] == [(2, "empty"), (6, "empty")]
    assert "member of 1/1" in rejected[0].detail
    unsorted = tmp_path / "verses.jsonl"
    unsorted.write_bytes((FIX / "verses_unsorted.jsonl").read_bytes())
    with pytest.raises(FidelError, match="records of group 1/1 are not contiguous"):
        list(iter_documents(user_registry["fx_verses"], tmp_path))


@pytest.mark.parametrize(
    "name", ["fx_bad", "fx_verses", "fx_paragraphs", "fx_tsv", "fx_compressed_glob", "fx_xml"]
)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharding_partitions_documents_and_rejections(user_registry, tmp_path, name, world_size):
    spec = user_registry[name]
    docs, rejected = read_all(spec, tmp_path)
    shard_docs, shard_rejected = [], []
    for rank in range(world_size):
        d, r = read_all(spec, tmp_path, rank, world_size)
        shard_docs += d
        shard_rejected += r
    assert sorted((d.id, d.text) for d in shard_docs) == sorted((d.id, d.text) for d in docs)
    assert Counter(shard_rejected) == Counter(rejected)
    with pytest.raises(FidelError, match="invalid shard"):
        list(iter_documents(spec, tmp_path, rank=world_size, world_size=world_size))


def test_per_document_licences_and_licence_selection(user_registry, tmp_path):
    docs, _ = read_all(user_registry["fx_licensed"], tmp_path)
    assert [(d.metadata["license"], d.metadata["license_family"]) for d in docs] == [
        ("CC BY 4.0", "open"),
        ("CC BY-NC 4.0", "noncommercial"),
        ("CC BY or CC BY-NC per story", "noncommercial"),
    ]
    (spec,) = select_sources(user_registry, names=["fx_licensed"], licence_families=["open"])
    docs, rejected = read_all(spec, tmp_path)
    assert [d.metadata["orig_id"] for d in docs] == ["s1"]
    assert [r.reason for r in rejected] == ["licence_excluded", "licence_excluded"]


def test_select_sources():
    registry = load_registry()
    assert [s.name for s in select_sources(registry)] == PRETRAIN
    open_only = select_sources(registry, licence_families=["open"])
    names = [s.name for s in open_only]
    assert "enh_corpus" in names and "ena_am_2022_2023" not in names and "alain_am_2024" not in names
    assert "african_storybook_am" in names and "nlpta_web_am_2025" in names  # filtered per document
    chosen = select_sources(registry, exclude=["amwiki_2015_dennis_sell"], weights={"enh_corpus": 0.5})
    assert "amwiki_2015_dennis_sell" not in [s.name for s in chosen]
    assert next(s for s in chosen if s.name == "enh_corpus").weight == 0.5
    assert [s.name for s in select_sources(registry, names=["amqa", "enh_corpus"])] == ["amqa", "enh_corpus"]
    with pytest.raises(FidelError, match="unknown source in exclude: nope"):
        select_sources(registry, exclude=["nope"])
    with pytest.raises(FidelError, match="unknown licence family free"):
        select_sources(registry, licence_families=["free"])
    with pytest.raises(FidelError, match="must be >= 0"):
        select_sources(registry, weights={"enh_corpus": -1})


def test_eval_units_on_fixtures(user_registry, tmp_path):
    units = list(
        iter_eval_units(tmp_path, ["fx_eval_lines", "fx_eval_squad", "fx_eval_conll"], user_registry)
    )
    ids = [u.unit_id for u in units]
    assert ids[:3] == [
        "fx_eval_lines/dev:0",
        "fx_eval_lines/dev:1",
        "fx_eval_lines/dev:3",
    ]  # empty line skipped
    assert "fx_eval_squad/dev:ctx2" in ids and "fx_eval_squad/dev:a1" in ids
    assert units[-1].text == "ኢትዮጵያ አገር" and units[-1].set_name == "fx_eval_conll"
    with pytest.raises(FidelError, match="unknown evaluation set fx_good"):
        list(iter_eval_units(tmp_path, ["fx_good"], user_registry))


# ---------------------------------------------------------------------------------------------- real data

EXPECTED_DOCS = {  # MANIFEST.md: A1 13,093; A2 120; A3 1,189 chapters; section G table (after removals)
    "enh_corpus": 13_093, "geez_ebooks_amharic": 120, "amharic_bible_wordproject": 1_189,
    "amwiki_2015_dennis_sell": 10_263, "alain_am_2024": 1_087, "ena_am_2022_2023": 1_400,
    "bbc_amharic_scitech": 441, "nlpta_web_am_2025": 223, "amharic_hatespeech_tweets": 23_051,
    "uhh_amharic_social_questions": 7_912, "amharic_fb_comments": 4_930, "african_storybook_am": 17,
}  # fmt: skip
EXPECTED_LINES = {  # MANIFEST: ENH 120,523 text lines, ebooks 219,017, Bible 30,272 non-empty verses,
    "enh_corpus": 120_523, "geez_ebooks_amharic": 219_017,  # wiki 21,730 non-empty lines
    "amharic_bible_wordproject": 30_272, "amwiki_2015_dennis_sell": 21_730,
}  # fmt: skip


@pytest.fixture(scope="module")
def real():
    data_dir = resolve_data_dir()
    registry = load_registry()
    started = time.perf_counter()
    results = {name: read_all(registry[name], data_dir) for name in PRETRAIN}
    return data_dir, registry, results, time.perf_counter() - started


def test_real_pretraining_sources_match_the_manifest(real):
    _, _, results, seconds = real
    for name, (docs, rejected) in results.items():
        assert len(docs) == EXPECTED_DOCS[name], name
        reasons = Counter(r.reason for r in rejected)
        expected = {"empty": 480} if name == "amharic_bible_wordproject" else {}
        assert reasons == expected, (name, reasons)
        assert len({d.id for d in docs}) == len(docs), f"{name}: duplicate ids"
        if name in EXPECTED_LINES:
            assert sum(d.text.count("\n") + 1 for d in docs) == EXPECTED_LINES[name], name
    assert seconds < 20


def test_real_metadata_and_licences(real):
    _, _, results, _ = real
    families = Counter(d.metadata["license_family"] for d in results["african_storybook_am"][0])
    assert families == {"open": 15, "noncommercial": 2}
    nlpta = Counter(d.metadata["license_family"] for d in results["nlpta_web_am_2025"][0])
    assert nlpta == {"open": 122, "unknown": 68 + 33}  # wikipedia CC BY-SA; BBC, EBC no licence
    tweets = results["amharic_hatespeech_tweets"][0]
    assert all(d.metadata["date"] for d in tweets) and tweets[0].id.startswith(
        "amharic_hatespeech_tweets/tweet/"
    )
    assert results["amharic_bible_wordproject"][0][0].id == "amharic_bible_wordproject/1/1"


def test_real_sharding_over_two_ranks_matches_one_rank(real):
    data_dir, registry, results, _ = real
    for name in PRETRAIN:
        full = {d.id: hash(d.text) for d in results[name][0]}
        sharded, rejected = {}, 0
        for rank in (0, 1):
            docs, rank_rejected = read_all(registry[name], data_dir, rank, 2)
            assert not set(sharded) & {d.id for d in docs}
            sharded.update({d.id: hash(d.text) for d in docs})
            rejected += len(rank_rejected)
        assert sharded == full and rejected == len(results[name][1]), name


def test_real_eval_units_match_the_manifest():
    counts = Counter(u.unit_id.rsplit(":", 1)[0] for u in iter_eval_units(resolve_data_dir()))
    expected = {
        "flores200/dev": 997, "flores200/devtest": 1_012,
        "sib200/train": 701, "sib200/dev": 99, "sib200/test": 204,
        "masakhanews_amh/dev": 188, "masakhanews_amh/test": 376, "masakhanews_amh/fewshot50_train": 200,
        "ntrex128/test": 1_997, "mafand_mt_en_amh/dev": 899, "mafand_mt_en_amh/test": 1_037,
        "masakhaner_amh/train": 1_750, "masakhaner_amh/dev": 250, "masakhaner_amh/test": 500,
        "afrisenti_amh/train": 5_984, "afrisenti_amh/dev": 1_497, "afrisenti_amh/test": 1_999,
        "amqa/train": 286 + 2 * 1_723, "amqa/dev": 57 + 2 * 600, "amqa/test": 33 + 2 * 299,
    }  # fmt: skip
    assert dict(counts) == expected
