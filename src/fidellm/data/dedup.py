"""Near-duplicate detection with datatrove's MinHash LSH, taught to read Amharic.

datatrove's MinHash stages (signatures -> buckets -> clusters -> filter) need a word tokenizer for the
language. Ours splits on whitespace and Ethiopic/ASCII punctuation and folds homophone spellings
(ሐ/ሀ, ሠ/ሰ, ዐ/አ, ፀ/ጸ, labialized forms), so two copies of an article typed with different homophone
letters still share their shingles. With the default 14 buckets x 8 hashes, documents with Jaccard
similarity of their 5-word shingles around 0.75 and above are clustered; one document per cluster is kept.

`AmharicMinhashSignature` hashes each word with blake2b (the frequent ones cached per process) and
combines the word hashes of every shingle with numpy (`hashing.ngram_hashes`) instead of joining and
SHA-1-hashing each shingle's string: another hash family of the same kind, in about a third less time
(benchmarks/RESULTS.md, "Every source in val and test").
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from fidellm.data.amharic import fold, sentences, words
from fidellm.data.config import DedupConfig
from fidellm.hashing import ngram_hashes, stable_hash64

_WORD_SPAN = re.compile(r"\S+")


class AmharicWordTokenizer(WordTokenizer):
    """Word/sentence splitting for Amharic, with homophone folding (used for dedup keys only)."""

    def __init__(self) -> None:
        super().__init__("amh")

    def word_tokenize(self, text: str) -> list[str]:
        return words(fold(text))

    def sent_tokenize(self, text: str) -> list[str]:
        return sentences(text)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [match.span() for match in _WORD_SPAN.finditer(text)]


def minhash_config(config: DedupConfig) -> MinhashConfig:
    """datatrove's MinHash settings from ours. Numbers are masked and case folded before shingling;
    datatrove's diacritic stripping is off because it is meaningless for Ethiopic syllables."""
    return MinhashConfig(
        n_grams=config.n_grams,
        num_buckets=config.num_buckets,
        hashes_per_bucket=config.hashes_per_bucket,
        seed=config.seed,
        norm_config=TextNormConfig(norm_unicode_diacritics=False),
        hash_config=HashConfig(precision=64, hash_fc="sha1"),  # only its precision is used here
    )


@lru_cache(maxsize=1 << 16)
def _word_hash(word: str) -> int:
    """A word's 64-bit hash, cached: a few frequent words are most of any text. On half of the demo corpus
    (5.0M words, 524,540 distinct) 2**16 entries (about 13 MB) answer 83.5 % of the lookups, 2**20 entries
    89.6 % for 133 MB more at the signature step's peak (652 MB instead of 560 MB) and 3-7 % less CPU."""
    return stable_hash64(word, person=b"shingle")


class AmharicMinhashSignature(MinhashDedupSignature):
    """datatrove's signature step with the Amharic word tokenizer and vectorized shingle hashes."""

    def __init__(self, output_folder: str, config: MinhashConfig) -> None:
        super().__init__(output_folder=output_folder, config=config, language=AmharicWordTokenizer())

    def get_shingles(self, text: str) -> np.ndarray:
        """Hashes of the text's word n-grams, shape (number of n-grams, 1) as datatrove expects."""
        ws = self.word_tokenizer.word_tokenize(simplify_text(text, self.config.norm_config))
        ids = np.fromiter(map(_word_hash, ws), dtype=np.uint64, count=len(ws))
        return ngram_hashes(ids, self.config.n_grams).reshape(-1, 1)
