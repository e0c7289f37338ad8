"""Supervised chat fine-tuning: conversation batches with assistant-only masks, LoRA and QLoRA."""

import logging

# bitsandbytes (imported by peft when installed) warns on every import on AVX512-BF16 CPUs that it could
# not fetch an optional kernel from the Hugging Face hub; we never download at run time, so the portable
# path it falls back to is the intended one.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
