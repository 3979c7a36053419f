#!/usr/bin/env bash
# One prepared GPU session: benchmarks first, then the training runs (the lead's part below).
#
#   bash benchmarks/gpu.sh          # on the GPU machine; everything lands in $OUT (or runs/gpu-<time>)
#   bash benchmarks/gpu.sh --dry    # every part on CPU with tiny sizes (~2 min): checks the script itself
#
# Each part has its own log, a hard timeout, and `|| true`: one failing part never costs the others.
set -u
cd "$(dirname "$0")/.."
DRY=0; [ "${1:-}" = "--dry" ] && DRY=1
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
        > "$OUT_DIR/pip.log" 2>&1 || log "pip install of .gpu/*.whl failed (see pip.log)"
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

# --- environment -----------------------------------------------------------------------------------
{ nvidia-smi || echo "no nvidia-smi"; } > "$OUT_DIR/nvidia-smi.log" 2>&1 || true
python3 -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')
import importlib
for m in ('diffusers', 'transformers', 'peft'):
    try: print(m, importlib.import_module(m).__version__)
    except Exception as e: print(m, 'missing:', e)" > "$OUT_DIR/versions.log" 2>&1 || true
cat "$OUT_DIR/versions.log"

# --- benchmarks (<= 2 minutes on an H200) -----------------------------------------------------------
if [ $DRY = 1 ]; then
    B="python3 benchmarks/run.py --device cpu --dtype fp32 --batch 2 --iters 1"
    SHAPES=cifar-tiny,pixart-tiny; CIFAR=cifar-tiny
else
    B="python3 benchmarks/run.py --device cuda --dtype bf16 --batch 128 --iters 3"
    SHAPES=cifar,pixart-small; CIFAR=cifar
fi
part bench-step      120 $B --only step --shapes $SHAPES --json "$OUT_DIR/bench-step.json"
part bench-measures   60 $B --only measures --shapes $CIFAR --json "$OUT_DIR/bench-measures.json"
part bench-roofline   60 $B --only roofline --shapes $SHAPES --json "$OUT_DIR/bench-roofline.json"
part bench-sampling   45 $B --only sampling --shapes $CIFAR --json "$OUT_DIR/bench-sampling.json"
part bench-profile    60 $B --profile --shapes $CIFAR
grep -h "^\[" "$OUT_DIR"/bench-*.log | tee "$OUT_DIR/bench-summary.log"

# --- training runs: THE LEAD ADDS THEM HERE --------------------------------------------------------
# e.g. part train-paper 300 python3 train_cifar.py --preset paper --out "$OUT_DIR/train-paper" ...
#      then a one-step FID on >= 5k samples of its last checkpoint (train_cifar.py --sample CKPT --fid 5000).
# Keep [ $DRY = 1 ] variants tiny (the smoke preset).

log "done; everything is in $OUT_DIR"
