"""Near-duplicate detection with datatrove's MinHash LSH, taught to read Amharic.

datatrove's MinHash stages (signatures -> buckets -> clusters -> filter) need a word tokenizer for the
language. Ours splits on whitespace and Ethiopic/ASCII punctuation and folds homophone spellings
(ሐ/ሀ, ሠ/ሰ, ዐ/አ, ፀ/ጸ, labialized forms), so two copies of an article typed with different homophone
letters still share their shingles. With the default 14 buckets x 8 hashes, documents with Jaccard
similarity of their 5-word shingles around 0.75 and above are clustered; one document per cluster is kept.
"""

from __future__ import annotations

import re

from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from fidellm.data.amharic import fold, sentences, words
from fidellm.data.config import DedupConfig

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
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )
