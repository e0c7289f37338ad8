"""Byte-level BPE (Hugging Face `tokenizers`) with the reserved tokens, trained on a run's train split.

Design:
- Byte-level model: text is UTF-8 bytes mapped to 256 printable stand-ins (GPT-2's ByteLevel), all 256
  in the initial alphabet, so every string encodes without <unk> and decodes back exactly.
- Pre-tokenization: every digit on its own (`Digits(individual_digits=True)`), then the GPT-2 regex
  (`'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`). Ethiopic letters are \\p{L}
  and Ethiopic punctuation (፠ ፡ ። ፣ ፤ ፥ ፦ ፧ ፨) is \\p{P}, so punctuation becomes its own pieces
  and a space attaches to the following word. This is exactly llama.cpp's "starcoder"/"smollm"
  pre-tokenizer (GGUF `tokenizer.ggml.pre`, see GGUF_PRE); plain "gpt-2" would keep digit runs.
- No normalizer: text is normalized once in the data stage (llama.cpp ignores tokenizer normalizers).
- Ids 0-7 are the reserved tokens of `special.py`; a TemplateProcessing post-processor adds BOS.
Training is deterministic: the same texts in the same order give a byte-identical tokenizer.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from fidellm.data.split_files import read_split_file, split_files
from fidellm.errors import FidelError
from fidellm.hashing import file_sha256, unit_interval
from fidellm.jsonfile import read_json_object
from fidellm.tokenizer.base import META_FILE, RETRAIN, TextTokenizer, id_list, sha256_text
from fidellm.tokenizer.special import BOS, BOS_ID, CHAT_TOKENS, PAD, PAD_ID, RESERVED_TOKENS

DEFAULT_VOCAB_SIZE = 32000
DEFAULT_SAMPLE_MB = 300.0
DEFAULT_MODEL_MAX_LENGTH = 4096
MIN_FREQUENCY = 2
VOCAB_MULTIPLE = 64
GGUF_PRE = "starcoder"
"""llama.cpp pre-tokenizer name whose regexes equal PRE_TOKENIZER (digits split, then GPT-2's regex)."""
PRE_TOKENIZER = "digits-individual+bytelevel-gpt2-regex"


def _byte_level_bytes() -> dict[str, int]:
    """GPT-2's ByteLevel map read backwards: each of the 256 stand-in characters -> the byte it stands
    for (printable Latin-1 bytes stand for themselves, the others for chr(256), chr(257), ... in order)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    others = iter(range(256, 512))
    return {chr(byte if byte in printable else next(others)): byte for byte in range(256)}


BYTE_OF_CHAR = _byte_level_bytes()


def build_untrained() -> Tokenizer:
    """An empty byte-level BPE with this project's pre-tokenizer and decoder, and no normalizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def check_vocab_size(vocab_size: int) -> None:
    """Vocabulary sizes are multiples of 64 (embedding padding) and leave room for merges."""
    if vocab_size % VOCAB_MULTIPLE or vocab_size < 512:
        raise FidelError(f"vocab size {vocab_size} must be a multiple of {VOCAB_MULTIPLE} and at least 512")
    if vocab_size > 2**32:
        raise FidelError(f"vocab size {vocab_size} is too large (token shards hold at most 2**32 ids)")


class BPETokenizer(TextTokenizer):
    """A trained byte-level BPE: a `tokenizers.Tokenizer` plus the provenance recorded at training."""

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer, meta: dict[str, Any] | None = None, source: Path | None = None):
        """`source` (the tokenizer.json read) names the file in errors."""
        self.hf = tokenizer
        self._meta = {**(meta or {}), "kind": self.kind}
        self._check_reserved(source)
        self._batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self._added = tokenizer.get_added_tokens_decoder()
        if self.encode("a", add_bos=True) != [BOS_ID, *self.encode("a")]:  # else add_bos did something else
            raise FidelError(
                f"{source or 'tokenizer'}: its post-processor does not put {BOS} (alone) before the text,"
                " so documents would not start with BOS; train it with `fidellm tokenizer train`"
            )

    def _check_reserved(self, source: Path | None) -> None:
        """Ids 0-7 must be the reserved tokens with their special flags (the chat template, SFT and the
        server rely on them), else the file is not ours."""
        added = self.hf.get_added_tokens_decoder()
        for token in RESERVED_TOKENS:
            found = added.get(token.id)
            if found is None or found.content != token.content or found.special != token.special:
                actual = "no added token" if found is None else f"{found.content!r} (special={found.special})"
                raise FidelError(
                    f"{source or 'tokenizer'}: id {token.id} should be {token.content!r}"
                    f" (special={token.special}), found {actual}: not a tokenizer from `fidellm tokenizer"
                    " train`, whose reserved ids 0-7 the chat template and SFT need"
                )

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Through the batch call, which gives the same ids: `tokenizers`' single `encode` holds the GIL
        for the whole call, so a prompt of megabytes (seconds) would stall every other thread, the
        server's event loop included; the batch call releases it (and skips offsets: faster)."""
        return self._batch([text], add_special_tokens=add_bos)[0].ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        return [encoding.ids for encoding in self._batch(list(texts), add_special_tokens=add_bos)]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(id_list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """An added token's text (b"" for a special one when skipped), else the bytes its ByteLevel
        stand-in characters encode; b"" for an id outside the vocabulary, which `decode` drops too."""
        added = self._added.get(token_id)
        if added is not None:
            return b"" if added.special and skip_special_tokens else added.content.encode("utf-8")
        piece = self.hf.id_to_token(token_id)
        return b"" if piece is None else bytes(BYTE_OF_CHAR[char] for char in piece)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return BOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def meta(self) -> dict[str, Any]:
        return {**self._meta, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        return sha256_text(self.hf.to_str())

    def save(
        self,
        directory: str | os.PathLike,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
        chat_template: str | None = None,
    ) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and META_FILE.

        The files load with `transformers.AutoTokenizer.from_pretrained(directory)` (tested with
        transformers 5; the config names "PreTrainedTokenizerFast", the class 4.x also has).
        `chat_template` (a Jinja string) is inlined into tokenizer_config.json when given; the HF
        exporter passes the model's context as `model_max_length`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"), pretty=True)
        files = {
            "tokenizer_config.json": hf_tokenizer_config(model_max_length, chat_template),
            "special_tokens_map.json": {
                "bos_token": BOS,
                "eos_token": BOS,
                "pad_token": PAD,
                "additional_special_tokens": list(CHAT_TOKENS),
            },
            META_FILE: self.meta,
        }
        for name, content in files.items():
            text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
            (directory / name).write_text(text, encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BPETokenizer:
        """Read tokenizer.json (and META_FILE when present) from a saved directory."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FidelError(f"{path} does not exist")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise FidelError(f"{path}: cannot load tokenizer: {error}") from error
        meta_path = directory / META_FILE
        meta = read_json_object(meta_path, RETRAIN) if meta_path.is_file() else {}
        return cls(tokenizer, meta, source=path)


def hf_tokenizer_config(model_max_length: int, chat_template: str | None = None) -> dict[str, Any]:
    """tokenizer_config.json written by hand: transformers 5's save_pretrained writes a class 4.x lacks."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": BOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": list(CHAT_TOKENS),
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(token.id): {
                "content": token.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": token.special,
            }
            for token in RESERVED_TOKENS
        },
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    length: int | None = None,
    show_progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` ids (reserved tokens included) on `texts`, in one pass.

    The result may have fewer ids than asked when the text has too few distinct pairs.
    """
    check_vocab_size(vocab_size)
    tokenizer = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=[AddedToken(t.content, special=True, normalized=False) for t in RESERVED_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    # The trainer marks every token it is given as special; the tool tags must stay plain text.
    data = json.loads(tokenizer.to_str())
    for entry, token in zip(data["added_tokens"], RESERVED_TOKENS, strict=True):
        if entry["id"] != token.id or entry["content"] != token.content:
            raise FidelError(
                f"trained tokenizer put {entry['content']!r} at id {entry['id']}, expected {token}"
            )
        entry["special"] = token.special
    info = {
        "vocab_size_requested": vocab_size,
        "min_frequency": MIN_FREQUENCY,
        "pre_tokenizer": PRE_TOKENIZER,
        "gguf_pre": GGUF_PRE,
        "tokenizers_version": tokenizers.__version__,
    }
    return BPETokenizer(Tokenizer.from_str(json.dumps(data)), {**info, **(meta or {})})


def truncate_bpe(tokenizer: BPETokenizer, vocab_size: int) -> BPETokenizer:
    """The BPE that training with `vocab_size` on the same text gives, cut out of a larger one.

    BPE training is greedy and the requested size only decides when it stops: ids are handed out in
    merge order, so the smaller tokenizer is the ids below `vocab_size` and the merges up to the one
    that made id `vocab_size - 1` (tests check the result against training directly). A vocabulary
    sweep then trains once, at its largest size.
    """
    check_vocab_size(vocab_size)
    if vocab_size >= tokenizer.vocab_size:  # the training ran out of pairs before this size
        return tokenizer
    data = json.loads(tokenizer.hf.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list = data["model"]["merges"]
    last = vocab_size - 1
    # tokenizers >= 0.20 writes a merge as [left, right], older versions as "left right"
    made = (vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "", 1)) for m in merges)
    cut = next((index + 1 for index, token_id in enumerate(made) if token_id == last), None)
    if cut is None:
        raise FidelError(f"no merge of this tokenizer makes id {last}; it cannot be cut to {vocab_size} ids")
    data["model"]["vocab"] = {token: index for token, index in vocab.items() if index < vocab_size}
    data["model"]["merges"] = merges[:cut]
    meta = {key: value for key, value in tokenizer.meta.items() if key not in ("vocab_size", "fingerprint")}
    meta.update(vocab_size_requested=vocab_size, cut_from_vocab_size=tokenizer.vocab_size)
    return BPETokenizer(Tokenizer.from_str(json.dumps(data)), meta)


@dataclass
class TrainingSample:
    """A deterministic sample of a run's train split: documents whose id-hash falls below `threshold`.

    Documents of weight 0 are left out (the user excluded their source); all others count once,
    whatever their weight, so frequent sources do not dominate the vocabulary twice over.
    """

    files: list[Path]
    threshold: float
    docs: int
    bytes: int
    total_docs: int
    total_bytes: int
    file_hashes: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            for doc in read_split_file(path):
                if doc.weight > 0 and unit_interval(f"sample:{doc.id}") < self.threshold:
                    yield doc.text

    def describe(self, run_dir: Path) -> dict[str, Any]:
        """Provenance for META_FILE and reports."""
        return {
            "run": str(run_dir),
            "split": "train",
            "files": self.file_hashes,
            "docs": self.docs,
            "bytes": self.bytes,
            "total_docs": self.total_docs,
            "total_bytes": self.total_bytes,
            "sample_threshold": self.threshold,
        }


def sample_train_split(
    run_dir: str | os.PathLike, sample_mb: float | None = DEFAULT_SAMPLE_MB, show_progress: bool = False
) -> TrainingSample:
    """Choose up to `sample_mb` MB (10**6 bytes of UTF-8; None = all) of RUN's train split.

    Documents are taken in order of a hash of their id until the budget is reached, so the choice is
    the same on every run and independent of file order.
    """
    files = split_files(run_dir, "train")
    keys: list[float] = []
    sizes: list[int] = []
    documents = (doc for path in files for doc in read_split_file(path))
    for doc in tqdm(documents, desc="sizing training text", unit=" docs", disable=not show_progress):
        if doc.weight > 0:
            keys.append(unit_interval(f"sample:{doc.id}"))
            sizes.append(len(doc.text.encode("utf-8")))
    if not keys:
        raise FidelError(
            f"the train split of {run_dir} has no documents of weight > 0 to train a tokenizer on"
        )
    key_array = np.asarray(keys)
    size_array = np.asarray(sizes, dtype=np.int64)
    order = np.argsort(key_array, kind="stable")
    cumulative = np.cumsum(size_array[order])
    budget = cumulative[-1] if sample_mb is None else int(sample_mb * 1e6)
    count = max(1, int(np.searchsorted(cumulative, budget, side="right")))
    threshold = 1.0 if count == len(keys) else float(key_array[order[count]])
    chosen = key_array < threshold
    return TrainingSample(
        files=files,
        threshold=threshold,
        docs=int(chosen.sum()),
        bytes=int(size_array[chosen].sum()),
        total_docs=len(keys),
        total_bytes=int(cumulative[-1]),
        file_hashes={path.name: file_sha256(path) for path in files},
    )


def train_from_run(
    run_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    sample_mb: float | None = DEFAULT_SAMPLE_MB,
    show_progress: bool = True,
    sample: TrainingSample | None = None,
) -> BPETokenizer:
    """Train on a sample of RUN/data/splits/train/*.jsonl.gz, streamed (never all in memory at once).

    `tokenizers` shows the progress (documents read, then merges) when `show_progress`.
    """
    check_vocab_size(vocab_size)
    sample = sample or sample_train_split(run_dir, sample_mb, show_progress)
    return train_bpe(
        iter(sample),
        vocab_size,
        length=sample.docs,
        show_progress=show_progress,
        meta={"sample_mb": sample_mb, "training": sample.describe(Path(run_dir))},
    )
