#!/usr/bin/env bash
# The two-GPU measurements of issues 4, 5, 6 and 7 on one node with 2 GPUs (e.g. two H200s), results into
# the repository. Each stage is one or a few commands; a failing command is reported and the others go on.
#
#   bash bench/two_gpu.sh                        # all stages, results in bench/results/
#   STAGES="cp exchange" bash bench/two_gpu.sh   # a subset of: cp exchange tpdp launch
#   SMOKE=1 bash bench/two_gpu.sh /tmp/smoke     # the same commands on CPU (gloo), tiny sizes: a check of
#                                                # the script itself, about five minutes on 2 cores
#
# Stages:
#   cp        (issue 5) bench/cp.py: fwd+bwd attention at global T = 32k, 64k, 128k, H=16, D=128, bf16, cp=2
#             ring (zigzag and contiguous) and Ulysses against the single-GPU kernel timed in the same run:
#             efficiency t1 / (2 t2), memory per rank, errors against the single-GPU kernel and fp32.
#   exchange  (issue 6) bench/cp_exchange.py: the ACP-aware exchange against the dense ring at cp=2, T=128k,
#             local / mixed / global gates: bytes posted and fwd+bwd time.
#   tpdp      (issue 4) FoX Pro 125M for $TPDP_STEPS steps on 1 GPU, tp=2 (sequence parallel), dp=2 and
#             dp=2 with ZeRO-1, same global batch; bench/compare_runs.py checks the loss curves against the
#             1-GPU run (relative tolerance $TOL) and records tokens/s, MFU and memory; foxdist plot draws them.
#   launch    (issue 7) FoX Pro 125M through torchrun --standalone --nproc-per-node 2 for $LAUNCH_STEPS steps at
#             its 16k context (tensorboard, metrics, PNG), then foxdist bench scaling over cp = 1,2 and tp = 1,2.
# Needs: torch + triton with CUDA (or SMOKE=1), foxdist importable (pip install -e ., or PYTHONPATH=kernels:.),
# deepspeed and megatron-core for tpdp/launch. Run directories go to $RUNS (default /tmp/foxdist-two-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
STAGES=${STAGES:-"cp exchange tpdp launch"}
RUNS=${RUNS:-/tmp/foxdist-two-gpu}
TOL=${TOL:-0.02}
export PYTHONPATH="kernels:.${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2)
FOXDIST=("$PY" -m foxdist)

if [ "${SMOKE:-0}" = 1 ]; then
    RECIPE=recipes/debug.py:tiny
    TRAIN_SET=(--set train.device=cpu --set data.seq_len=128 --set train.global_batch_size=8
               --set train.micro_batch_size=4)
    TPDP_STEPS=${TPDP_STEPS:-6}; LAUNCH_STEPS=${LAUNCH_STEPS:-6}; TOL=${SMOKE_TOL:-0.05}
    LAUNCH_SET=()
    CP_ARGS=(--device cpu --seqs 256 --heads 2 --dim 16 --reps 1 --warmup 1 --ref-max-t 256)
    EX_ARGS=(--device cpu --seq 2048 --heads 2 --dim 8 --tile 64 --reps 1)
    SCALE_SET=(--set train.device=cpu --set data.seq_len=256 --set train.global_batch_size=2
               --set train.micro_batch_size=1)
    SCALE_STEPS=(--steps 2 --warmup 1)
else
    N=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
    if [ "$N" -lt 2 ]; then
        echo "bench/two_gpu.sh needs 2 GPUs on this node (found $N); SMOKE=1 runs it on CPU" >&2
        exit 2
    fi
    RECIPE=${RECIPE:-recipes/fox_pro.py:fox_pro_125m}
    # byte-level stdlib text (no prepared corpus needed): this measures the model body and the parallel layers
    TRAIN_SET=(--set data.seq_len=4096 --set train.global_batch_size=8 --set train.micro_batch_size=4)
    TPDP_STEPS=${TPDP_STEPS:-50}; LAUNCH_STEPS=${LAUNCH_STEPS:-300}
    # the recipe's own 16k context; 8 sequences (131k tokens) per step and a 30-step warmup instead of the
    # paper's 0.5M tokens and 512 steps, so that a few hundred steps fit one slot and show the loss falling
    LAUNCH_SET=(--set data.seq_len=16384 --set train.global_batch_size=8 --set train.micro_batch_size=1
                --set schedule.warmup_steps=30)
    CP_ARGS=(--seqs 32768 65536 131072 --heads 16 --dim 128 --reps 10 --warmup 3)
    EX_ARGS=(--device cuda --seq 131072 --heads 16 --dim 128 --reps 5)
    SCALE_SET=(--set data.seq_len=16384 --set train.global_batch_size=2 --set train.micro_batch_size=1)
    SCALE_STEPS=(--steps 20 --warmup 5)
fi
COMMON=(--set data.source=stdlib --set train.eval_every=0 --set checkpoint.every=100000
        --set logging.progress=lines "${TRAIN_SET[@]}")
mkdir -p "$OUT" "$RUNS"
FAILED=0
run() { echo "+ $*" >&2; "$@" || { echo "FAILED (exit $?): $*" >&2; FAILED=1; }; }
fresh() { rm -rf "${RUNS:?}/$1"; echo "$RUNS/$1"; }  # a run directory of this script, started over
gpu=$( [ "${SMOKE:-0}" = 1 ] && echo cpu || nvidia-smi --query-gpu=name --format=csv,noheader | head -1 \
       | tr 'A-Z ' 'a-z-' | sed 's/nvidia-//')
day=$(date -u +%F)

for stage in $STAGES; do
    case "$stage" in
    cp)
        run "${TORCHRUN[@]}" bench/cp.py "${CP_ARGS[@]}" --modes ring@zigzag ring@contiguous ulysses --out "$OUT" ;;
    exchange)
        run "${TORCHRUN[@]}" bench/cp_exchange.py "${EX_ARGS[@]}" --out "$OUT" ;;
    tpdp)
        steps=(--set train.max_steps="$TPDP_STEPS")
        r1=$(fresh tpdp-1gpu); rtp=$(fresh tpdp-tp2-sp); rdp=$(fresh tpdp-dp2); rz=$(fresh tpdp-dp2-zero1)
        run "$PY" -m foxdist.train --recipe "$RECIPE" "${COMMON[@]}" "${steps[@]}" --run-dir "$r1"
        run "${TORCHRUN[@]}" -m foxdist.train --recipe "$RECIPE" "${COMMON[@]}" "${steps[@]}" \
            --set parallel.tp=2 --set parallel.sequence_parallel=true --run-dir "$rtp"
        run "${TORCHRUN[@]}" -m foxdist.train --recipe "$RECIPE" "${COMMON[@]}" "${steps[@]}" --run-dir "$rdp"
        run "${TORCHRUN[@]}" -m foxdist.train --recipe "$RECIPE" "${COMMON[@]}" "${steps[@]}" \
            --set parallel.zero_stage=1 --run-dir "$rz"
        run "$PY" bench/compare_runs.py "$r1" "$rtp" "$rdp" "$rz" --tol "$TOL" \
            --out "$OUT/tp-dp-125m-$gpu-$day.json" \
            --command "STAGES=tpdp bash bench/two_gpu.sh (recipe $RECIPE, ${COMMON[*]} ${steps[*]})"
        run "${FOXDIST[@]}" plot "$r1" "$rtp" "$rdp" "$rz" --out "$OUT/tp-dp-125m-$gpu-$day.png" ;;
    launch)
        rl=$(fresh launch-125m-2gpu)
        run "${TORCHRUN[@]}" -m foxdist.train --recipe "$RECIPE" "${COMMON[@]}" "${LAUNCH_SET[@]}" \
            --set train.max_steps="$LAUNCH_STEPS" --run-dir "$rl"
        run "$PY" bench/compare_runs.py "$rl" --out "$OUT/launch-125m-2gpu-$gpu-$day.json" \
            --command "STAGES=launch bash bench/two_gpu.sh (recipe $RECIPE, ${COMMON[*]} ${LAUNCH_SET[*]}, $LAUNCH_STEPS steps)"
        run "${FOXDIST[@]}" plot "$rl" --out "$OUT/launch-125m-2gpu-$gpu-$day.png" --smooth 10
        run "${FOXDIST[@]}" bench scaling --recipe "$RECIPE" --set data.source=stdlib "${SCALE_SET[@]}" \
            --cp 1,2 --cp-mode ring --layout zigzag "${SCALE_STEPS[@]}" --out "$OUT/scaling-125m-cp-$gpu-$day"
        run "${FOXDIST[@]}" bench scaling --recipe "$RECIPE" --set data.source=stdlib "${SCALE_SET[@]}" \
            --tp 1,2 "${SCALE_STEPS[@]}" --out "$OUT/scaling-125m-tp-$gpu-$day" ;;
    *)
        echo "unknown stage '$stage' (choose from: cp exchange tpdp launch)" >&2
        exit 2 ;;
    esac
done
echo "results in $OUT, run directories in $RUNS" >&2
exit "$FAILED"
