#!/usr/bin/env bash
# The multi-GPU measurements (issue 9) on ONE node of 2, 4 or 8 GPUs, results into the repository.
#
#   bash bench/multi_gpu.sh                 # all GPUs of this node, results in bench/results/
#   bash bench/multi_gpu.sh 4 /tmp/results  # 4 GPUs, elsewhere
#   STAGES="attention exchange" bash bench/multi_gpu.sh 8   # a subset of: attention exchange train
#
# Stages (each one command per GPU count, so a failure leaves the others' JSON in place):
#   attention  bench/cp.py: fwd+bwd at T = 128k, 256k, 512k (H=16, D=128, bf16) for cp = 2, 4, 8 (<= N):
#              ring (zigzag and contiguous), ulysses, hybrid (Ulysses pairs, and quads at 8); the
#              single-GPU kernel is timed in the same run (efficiency = t1 / (cp * t_cp)), memory per rank.
#   exchange   bench/cp_exchange.py: the ACP-aware exchange vs the dense ring at cp = 2, 4, 8 (<= N),
#              T = 128k, local / mixed / global gates: bytes posted and fwd+bwd time.
#   train      foxdist bench scaling: FoX Pro 760M at 128k (recipes/long_context.py) for cp = 1..N with
#              the zigzag ring, and tp=2 x cp; tokens/s, MFU, memory, tensorboard curves and PNGs.
# Needs: torch + triton with CUDA; foxdist installed (pip install -e .) for the train stage.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
OUT=${2:-bench/results}
STAGES=${STAGES:-"attention exchange train"}
STEPS=${STEPS:-100}
export PYTHONPATH="kernels:.${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
FAILED=0
run() { echo "+ $*" >&2; "$@" || { echo "FAILED (exit $?): $*" >&2; FAILED=1; }; }
degrees() { local d=2; while [ "$d" -le "$N" ]; do echo "$d"; d=$((d * 2)); done; }

if [ "$N" -lt 2 ]; then
    echo "bench/multi_gpu.sh needs at least 2 GPUs on this node (found $N)" >&2
    exit 2
fi

for stage in $STAGES; do
    case "$stage" in
    attention)
        for n in $(degrees); do
            modes="ring@zigzag ring@contiguous ulysses"
            [ "$n" -ge 4 ] && modes="$modes hybrid:2"
            [ "$n" -ge 8 ] && modes="$modes hybrid:4"
            # shellcheck disable=SC2086
            run torchrun --standalone --nproc_per_node="$n" bench/cp.py --seqs 131072 262144 524288 \
                --heads 16 --dim 128 --modes $modes --reps 5 --warmup 2 --out "$OUT"
        done ;;
    exchange)
        for n in $(degrees); do
            run torchrun --standalone --nproc_per_node="$n" bench/cp_exchange.py --device cuda --seq 131072 \
                --heads 16 --dim 128 --reps 5 --out "$OUT"
        done ;;
    train)
        cps=1; for n in $(degrees); do cps="$cps,$n"; done
        run foxdist bench scaling --recipe recipes/long_context.py:fox_pro_760m_128k --set parallel.tp=1 \
            --cp "$cps" --cp-mode ring --layout zigzag --steps "$STEPS" --warmup 5 --out "$OUT/scaling-760m-128k-cp"
        cps2=""; for n in $(degrees); do [ $((2 * n)) -le "$N" ] && cps2="${cps2:+$cps2,}$n"; done
        if [ -n "$cps2" ]; then
            run foxdist bench scaling --recipe recipes/long_context.py:fox_pro_760m_128k --set parallel.tp=2 \
                --cp "1,$cps2" --cp-mode ring --layout zigzag --steps "$STEPS" --warmup 5 \
                --out "$OUT/scaling-760m-128k-tp2xcp"
        fi ;;
    *)
        echo "unknown stage '$stage' (choose from: attention exchange train)" >&2
        exit 2 ;;
    esac
done
echo "results in $OUT" >&2
exit "$FAILED"
