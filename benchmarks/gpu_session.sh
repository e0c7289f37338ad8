#!/usr/bin/env bash
# The GPU measurements issue 3 still waits for, each one device call of at most 10 minutes.
#
# Here, once (CPU; RUN is a prepared and tokenized run such as runs/demo, the data dir holds flores200):
#   bash benchmarks/gpu_session.sh prepare runs/demo
# fills the git-ignored .carry/ (run tokens and tokenizer, FLORES dev+devtest; about 35 MB).
# Then one `run` call of the device tool per step, with carry [".carry"]:
#   bash benchmarks/gpu_session.sh check           # the CUDA-only paths of the engine (~3 minutes)
#   bash benchmarks/gpu_session.sh throughput      # 25m and 125m, fused loss on/off, + minimal GPT baseline
#   bash benchmarks/gpu_session.sh muon-throughput # 25m and 125m trained with --optimizer muon
#   bash benchmarks/gpu_session.sh compile-modes   # 25m under max-autotune-no-cudagraphs and reduce-overhead
#   bash benchmarks/gpu_session.sh quality 125m 1200 1e-3 [more quality_run.py options]
#   bash benchmarks/gpu_session.sh ema 25m 2400 2e-3 --decays 0.99,0.995,0.998 [more options]
# Logs and results land in $OUT (what comes back from the device); copy the markdown rows into
# benchmarks/RESULTS.md with the device named in the tool's reply.
set -euo pipefail

CARRY=.carry
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=src:benchmarks PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

step=${1:-}
shift || true
case "$step" in
prepare)
    run=${1:?usage: gpu_session.sh prepare RUN}
    data=${FIDELLM_DATA:-../shared/data}
    rm -rf "$CARRY" && mkdir -p "$CARRY/run" "$CARRY/data"
    cp -rL "$run/tokenizer" "$run/tokens" "$CARRY/run/"
    cp -rL "$data/flores200" "$CARRY/data/"
    du -sh "$CARRY"
    ;;
check)
    "$PYTHON" benchmarks/cuda_checks.py "$CARRY/run" 2>&1 | tee "$OUT/cuda_checks.log"
    ;;
throughput)
    "$PYTHON" benchmarks/bench_train.py "$CARRY/run" --presets 25m,125m --seq-len 1024 --batch-size 64 \
        --steps 150 --log-every 10 --loss-chunks 4096,0 --out /tmp/bench_train 2>&1 | tee "$OUT/throughput.log"
    "$PYTHON" benchmarks/minimal_gpt.py --preset 25m --seq-len 1024 --batch-size 64 --steps 150 \
        2>&1 | tee "$OUT/minimal_gpt.log"
    ;;
muon-throughput)  # the Muon step's cost at the throughput shapes (compare with `throughput`'s adamw rows)
    "$PYTHON" benchmarks/bench_train.py "$CARRY/run" --presets 25m,125m --seq-len 1024 --batch-size 64 \
        --steps 150 --log-every 10 --optimizers muon --out /tmp/bench_train 2>&1 | tee "$OUT/muon_throughput.log"
    for preset in 25m 125m; do
        "$PYTHON" benchmarks/bench_muon.py --preset $preset --device cuda 2>&1 | tee -a "$OUT/muon_throughput.log"
    done
    ;;
compile-modes)
    "$PYTHON" benchmarks/bench_train.py "$CARRY/run" --presets 25m --seq-len 1024 --batch-size 64 \
        --steps 150 --log-every 10 --compile-modes max-autotune-no-cudagraphs,reduce-overhead \
        --out /tmp/bench_train 2>&1 | tee "$OUT/compile_modes.log"
    ;;
quality|ema)  # quality_run.py: one recipe; ema_decays.py: one run, several weight averages
    preset=${1:?usage: gpu_session.sh quality|ema PRESET STEPS LR [options]}
    steps=${2:?steps}
    lr=${3:?lr}
    shift 3
    script=$([ "$step" = ema ] && echo ema_decays || echo quality_run)
    "$PYTHON" "benchmarks/$script.py" "$CARRY/run" --data-dir "$CARRY/data" --preset "$preset" \
        --steps "$steps" --lr "$lr" --eval-every $((steps / 10)) --out "/tmp/$step" "$@" \
        2>&1 | tee "$OUT/$step-$preset.log"
    cp "/tmp/$step"/*.json "$OUT/"
    for curves in "/tmp/$step"/*/train/curves.png; do cp "$curves" "$OUT/curves-$(basename "$(dirname "$(dirname "$curves")")").png"; done
    ;;
*)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
