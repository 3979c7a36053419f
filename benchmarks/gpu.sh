#!/usr/bin/env bash
# One prepared GPU session: benchmarks first, then the training runs (the lead's part below).
#
#   bash benchmarks/gpu.sh [PARTS]        # on the GPU machine; everything lands in $OUT (or runs/gpu-<time>)
#   bash benchmarks/gpu.sh --dry [PARTS]  # every part on CPU with tiny sizes: checks the script itself
# PARTS (default: bench train): any of
#   bench    train-step time + saved-for-backward memory, measures, roofline, sampling, profile (~2-5 min)
#   train    issue 16: the equal-wall-clock CIFAR-10 comparison (A-D) and the `paper` preset for a 4.5-minute
#            budget, with 1k / 5k one-step sample dumps (benchmarks/cifar_budget.py; FID of the dumps is computed
#            where an Inception detector is at hand: `python benchmarks/cifar_budget.py --eval DIR`)
#   teacher  issue 12: the PixArt-style CIFAR teacher and its 12 students (notebooks/teacher_gpu.sh)
#   realsize issue 15: one step of each finetune_t2i.py stage on a PixArt-α-512-sized pipeline, memory per phase
# `train` and `teacher` run side by side (one GPU, ~7 minutes); `bench` runs alone so its timings are clean.
#
# Each part has its own log, a hard timeout, and `|| true`: one failing part never costs the others.
set -u
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry" ] && { DRY=1; shift; }
PARTS=" ${*:-bench train} "
has() { [[ "$PARTS" == *" $1 "* ]]; }
OUT_DIR="${OUT:-runs/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
log() { echo "[gpu.sh $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT_DIR/gpu.log"; }
part() {                       # part NAME SECONDS CMD...: run CMD with a hard timeout, output to NAME.log
    local name=$1 secs=$(( $2 * (DRY ? 4 : 1) )); shift 2   # dry: a shared CPU is slow, the check is the script
    log "start $name (timeout ${secs}s): $*"
    timeout --kill-after=10 "$secs" "$@" > "$OUT_DIR/$name.log" 2>&1 || log "  $name exited $?"
    log "end $name"
}

# diffusers is not installed on the GPU machine: the lead carries a wheel in .gpu/ (git-ignored)
if [ -d .gpu ] && ls .gpu/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl \
        >> "$OUT_DIR/gpu.log" 2>&1 || log "pip install of .gpu/*.whl failed"
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

# --- environment -----------------------------------------------------------------------------------
{ nvidia-smi || echo "no nvidia-smi"; } >> "$OUT_DIR/gpu.log" 2>&1 || true
python3 -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')
import importlib
for m in ('diffusers', 'transformers', 'peft'):
    try: print(m, importlib.import_module(m).__version__)
    except Exception as e: print(m, 'missing:', e)" 2>&1 | tee -a "$OUT_DIR/gpu.log" || true

# --- benchmarks (~2 minutes on an H200; the step figures first: they matter most) -------------------------
if has bench; then
if [ $DRY = 1 ]; then
    B="python3 benchmarks/run.py --device cpu --dtype fp32 --batch 2 --iters 1"
    SHAPES=cifar-tiny,pixart-tiny; CIFAR=cifar-tiny
else
    B="python3 benchmarks/run.py --device cuda --dtype bf16 --batch 128 --iters 3"
    SHAPES=cifar,pixart-small; CIFAR=cifar
fi
part bench-step      120 $B --only step --shapes $SHAPES --json "$OUT_DIR/bench-step.json"
part bench-profile    60 $B --profile --shapes $CIFAR
part bench-measures   60 $B --only measures --shapes $CIFAR --json "$OUT_DIR/bench-measures.json"
part bench-roofline   60 $B --only roofline --shapes $SHAPES --json "$OUT_DIR/bench-roofline.json"
part bench-sampling   45 $B --only sampling --shapes $CIFAR --json "$OUT_DIR/bench-sampling.json"
grep -h "^\[" "$OUT_DIR"/bench-*.log | tee -a "$OUT_DIR/gpu.log"
(cd "$OUT_DIR" && tar -cf bench.tar bench-* && rm -f bench-*.log bench-*.json)
fi

# --- training runs: issue 16's comparison + the paper preset, issue 12's teacher, side by side ---------------
[ -f .gpu/cifar10-train.zip ] && export YOSO_CIFAR_ZIP=${YOSO_CIFAR_ZIP:-$PWD/.gpu/cifar10-train.zip}
if has train; then
    if [ $DRY = 1 ]; then TRAIN=(--dry); else TRAIN=(--minutes 4.5 --limit 430); fi
    part train 470 python3 benchmarks/cifar_budget.py "$OUT_DIR/cifar" --with-paper "${TRAIN[@]}" &
fi
if has teacher; then
    [ $DRY = 1 ] && TDRY=--dry || TDRY=
    TEACHER_WALL=${TEACHER_WALL:-$([ $DRY = 1 ] && echo 720 || echo 420)} \
        part teacher 480 bash notebooks/teacher_gpu.sh "$OUT_DIR/teacher" $TDRY &
fi
wait
for f in train teacher; do [ -f "$OUT_DIR/$f.log" ] && tail -n 40 "$OUT_DIR/$f.log" >> "$OUT_DIR/gpu.log" && rm "$OUT_DIR/$f.log"; done
if has realsize; then               # the real-size PixArt-α check of issue 15 (minutes on a GPU, ~35 min on a CPU)
    [ $DRY = 1 ] && log "realsize: skipped in --dry (it is the 610M-parameter model)" || \
        part realsize 240 python3 benchmarks/realsize.py --data "$YOSO_CIFAR_ZIP" --log "$OUT_DIR/realsize.figures"
fi

log "done; everything is in $OUT_DIR"
