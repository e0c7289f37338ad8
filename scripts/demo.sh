#!/usr/bin/env bash
# The reference pipeline on the default data, end to end: every stage that exists so far.
# Usage: RUN=runs/demo bash scripts/demo.sh   (make demo sets RUN and PATH)
set -euo pipefail
RUN=${RUN:-runs/demo}
WORKERS=${WORKERS:-2}
STAGE_START=$SECONDS

stage() {  # "== i/10 what": the previous stage's wall time, then the next stage's title
  if [ -n "${STAGE_TITLE:-}" ]; then echo "   ($STAGE_TITLE: $((SECONDS - STAGE_START)) s)"; fi
  STAGE_TITLE=${1%%:*} STAGE_START=$SECONDS
  echo "== $1"
}

stage "1/10 data prepare: all Amharic pretraining sources -> $RUN/data"
fidellm data prepare "$RUN" --workers "$WORKERS" --overwrite

stage "2/10 tokenizer train: 32K BPE with byte fallback -> $RUN/tokenizer"
fidellm tokenizer train "$RUN" --vocab-size 32000 --sample-mb "${TOKENIZER_SAMPLE_MB:-40}"

stage "3/10 tokenizer report: fertility and round trip on FLORES amh dev+devtest"
fidellm tokenizer report "$RUN/tokenizer" --vocab-sizes 8000,16000,32000,64000 --sample-mb "${SWEEP_SAMPLE_MB:-20}"

stage "4/10 data tokenize: splits -> memory-mapped token shards in $RUN/tokens"
fidellm data tokenize "$RUN" --workers "$WORKERS"

stage "5/10 train: the tiny preset for a couple of minutes on CPU -> $RUN/train"
rm -rf "$RUN/train"  # a fresh smoke run each time
fidellm train "$RUN" --preset tiny --steps "${TRAIN_STEPS:-120}" --seq-len 256 --batch-size 8 \
  --optimizer muon --lr 3e-3 --warmup 20 --eval-every 40 --log-every 20

stage "6/10 generate: the probe prompts of evaluation.md, sampled with a fixed seed"
fidellm generate "$RUN" ይፈልጋሉ አማርኛ ኢትዮጵያ ቡና ሰላም --max-new-tokens 24 --seed 0 --device cpu

stage "7/10 export: a Hugging Face directory and a GGUF file; transformers reloads the directory"
fidellm export hf "$RUN" "$RUN/export/hf" --dtype float32
fidellm export gguf "$RUN" "$RUN/export/model-q8_0.gguf" --type q8_0
python - "$RUN" <<'EOF'
import sys

import torch
import transformers

from fidellm.models.load import load_model

run = sys.argv[1]
hf = transformers.AutoModelForCausalLM.from_pretrained(f"{run}/export/hf", dtype=torch.float32).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(f"{run}/export/hf")
ours, _ = load_model(run)
ids = tokenizer("ኢትዮጵያ በምሥራቅ አፍሪካ የምትገኝ አገር ናት፤ ዋና ከተማዋ አዲስ አበባ ነው።", return_tensors="pt").input_ids
with torch.no_grad():
    difference = (hf(ids).logits - ours.eval()(ids).logits).abs().max().item()
print(f"transformers {transformers.__version__} loads {run}/export/hf as {type(hf).__name__};"
      f" max |logit difference| from ours on {ids.shape[1]} tokens: {difference:.1e}")
EOF

stage "8/10 H-Net: the byte tokenizer on the same splits, hnet-tiny for a minute -> $RUN-bytes"
mkdir -p "$RUN-bytes" && ln -sfn "$(cd "$RUN" && pwd)/data" "$RUN-bytes/data"
fidellm tokenizer train "$RUN-bytes" --kind bytes
fidellm data tokenize "$RUN-bytes" --workers "$WORKERS"
rm -rf "$RUN-bytes/train"
fidellm train "$RUN-bytes" --arch hnet --preset hnet-tiny --steps "${HNET_STEPS:-150}" --seq-len 512 \
  --batch-size 4 --optimizer muon --lr 4e-3 --warmup 10 --eval-every 50 --log-every 20 --stage-lr-multipliers 2,1

stage "9/10 eval + report card: both runs -> $RUN/eval, $RUN-bytes/eval, $RUN/report"
# FLORES and the baselines use every line; held-out and downstream sets a sample of EVAL_LIMIT items
fidellm eval "$RUN" --device cpu --limit "${EVAL_LIMIT:-200}"
fidellm eval "$RUN-bytes" --device cpu --tasks flores,heldout,probes --limit "${EVAL_LIMIT:-200}"
fidellm report "$RUN" "$RUN-bytes"

stage "10/10 chat: conversations -> a short LoRA SFT of the demo model -> one scripted chat turn"
fidellm data chat "$RUN" --max-samples "${CHAT_SAMPLES:-100}" --overwrite
rm -rf "$RUN/sft"
fidellm sft "$RUN" --base "$RUN" --use-lora --lora-rank 8 --epochs 1 --batch-size 8 --seq-len 256 \
  --lr 1e-3 --warmup 5 --eval-every 20 --log-every 10
printf 'ሰላም፣ እንዴት ነህ?\n/exit\n' | fidellm chat "$RUN/sft/merged" --max-new-tokens 24 --seed 0 --device cpu
echo  # the chat prompt leaves the line open

stage "summary: $SECONDS s in all"
python - "$RUN" <<'EOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
data = json.loads((run / "data" / "report.json").read_text())
tok = json.loads((run / "tokenizer" / "report.json").read_text())
t = data["totals"]
print(f"data:      {t['kept_docs']:,} documents kept of {t['records_read']:,} read "
      f"({t['kept_bytes'] / 1e6:.1f} MB); exact dup {data['dedup']['exact_rate']:.2%}, "
      f"near dup {data['dedup']['near_rate']:.2%}; Amharic by language ID {data['language_id']['amharic_share']:.2%}")
for row in tok["measured"]:
    print(f"tokenizer: {row['name']}, vocab {row['vocab_size']:,}: {row['tokens_per_word']:.3f} tokens/word, "
          f"{row['bytes_per_token']:.2f} bytes/token, round trip {row['roundtrip_rate']:.2%} on FLORES amh")
for split in ("train", "val", "test"):
    meta = json.loads((run / "tokens" / split / "meta.json").read_text())
    print(f"tokens:    {split}: {meta['n_docs']:,} documents, {meta['n_tokens']:,} tokens")
val = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
val = [r for r in val if r.get("kind") == "val"][-1]
print(f"train:     tiny preset, step {val['step']}: val loss {val['val_loss']:.3f}, "
      f"val bits/byte {val['val_bpb']:.3f} (a CPU smoke run; GPU numbers in benchmarks/RESULTS.md)")
results = json.loads((run / "eval" / "results.json").read_text())["results"]
flores = next(r for r in results if r["task"] == "flores" and r["metric"] == "second_half_bits")
print(f"eval:      FLORES second-half bits {flores['value']:.2f} (published: bigram 111.87, Goldfish-10MB 121.29)")
print(f"next:      fidellm chat {run}/sft/merged   |   fidellm serve {run}/sft/merged --port 8000")
print(f"reports:   {run}/data/report.md  {run}/tokenizer/report.md  {run}/train/curves.png  {run}/report/report.md")
EOF
