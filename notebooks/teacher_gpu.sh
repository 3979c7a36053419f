#!/usr/bin/env bash
# teacher_gpu.sh OUTDIR [--dry] — issue 12's teacher experiment in ONE call on one GPU (~7 min wall):
#   1. the CIFAR-10 PixArt teacher on PixArt-α's linear schedule (teacher_cifar.py --stage teacher --device cuda)
#   2. 12 students of it with finetune_t2i.py --preset cifar-teacher, all at once, one process each:
#        paper_sS     --stage all  (adaption + zero terminal SNR, per-sample w_rec: the paper)   S = 0, 1, 2
#        released_sS  --stage all  --set yoso.rec_weight=released (the released code's batch-mean w_rec)
#        noadapt_sS   --stage yoso (ε base, informative prior)
#        abl-adapt1200, abl-kc100, abl-ganmean: the paper route (seed 0) with 3x adaption / k_C = 100 /
#        the released batch-mean GAN loss — the ablations, should (a) or (b) fail (no second GPU run)
#      each student then writes its 1- and 2-step eval images; the teacher's rows are written alongside
#   3. everything small (logs, metrics, sample grids, all eval images) packed into OUTDIR/teacher-{1,2,3}.tar
#      (<= 15.5 MiB each); unpack and evaluate on a CPU with teacher_cifar.py --stage unpack / eval / table.
# Every stage is bounded by the wall budget (a student still training at its deadline is stopped, checkpointed
# and exported as it is, marked "partial" in logs/status.txt); the pack runs whatever failed.
# --dry: the same flow on the CPU with tiny budgets (teacher 20 s, students 4 + 3 steps, N = 20).
# Environment: TEACHER_VAE (.gpu/teacher/vae), YOSO_CIFAR_ZIP (.gpu/cifar10-train.zip), TEACHER_WORK (work folder,
# NOT under OUTDIR: only the tar files come back), TEACHER_WALL (seconds, 400), PYTHON (python).
set -u
OUTDIR=${1:?usage: teacher_gpu.sh OUTDIR [--dry]}
DRY=0; [ "${2:-}" = "--dry" ] && DRY=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
mkdir -p "$OUTDIR"; OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=${TEACHER_WORK:-/tmp/teacher-work}
rm -rf "$WORK"; mkdir -p "$WORK/logs" "$WORK/students"
export TEACHER_VAE=${TEACHER_VAE:-$REPO/.gpu/teacher/vae}
[ -z "${YOSO_CIFAR_ZIP:-}" ] && [ -f "$REPO/.gpu/cifar10-train.zip" ] && export YOSO_CIFAR_ZIP=$REPO/.gpu/cifar10-train.zip
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
cd "$REPO"

if [ $DRY = 1 ]; then
    WALL=${TEACHER_WALL:-720}; DEVICE=cpu; N=20; ITEMS=200
    TEACHER=(--minutes 0.33 --batch 16 --layers 2 --heads 2 --head-dim 32 --warmup 10)
    # ~5 s a step on a busy CPU: the probe (forced) halves the steps; the 3x-adaption one may hit its deadline
    STEPS=(--set ipi_items=64 --set sample_every=4 --set ckpt_every=4); ADAPT=8; YOSO=24; PROBE=100
    PROBE_FORCE=${PROBE_FORCE:-0.5}
else
    WALL=${TEACHER_WALL:-400}; DEVICE=cuda; N=500; ITEMS=5000
    # 6 wide blocks: the step is launch-bound, so width is nearly free and depth is not (students pay for it too)
    TEACHER=(--minutes 1.8 --batch 512 --lr 5e-4 --warmup 300 --layers 6 --heads 6 --head-dim 64)
    STEPS=(); ADAPT=400; YOSO=1000; PROBE=45
fi
START=$(date +%s)
END=$((START + WALL - 25))                          # the pack's reserve
STUDENT_END=$((END - 55))                           # a student's training stops here: export + its eval images after
left() { local l=$(( ${1:-$END} - $(date +%s) )); [ $l -lt 1 ] && l=1; echo $l; }
log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$WORK/logs/status.txt"; }
log "teacher_gpu.sh dry=$DRY device=$DEVICE wall=${WALL}s work=$WORK vae=$TEACHER_VAE zip=${YOSO_CIFAR_ZIP:-default}"
{ nvidia-smi 2>&1 | head -20; $PY -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.is_available())"; } \
    >"$WORK/logs/env.txt" 2>&1

# --- 1. teacher ------------------------------------------------------------------------------------------------
[ -d "$TEACHER_VAE" ] || log "ERROR: no VAE at $TEACHER_VAE"
timeout -k 10 "$(left $STUDENT_END)" $PY notebooks/teacher_cifar.py --out "$WORK" --stage teacher --device $DEVICE \
    --vae "$TEACHER_VAE" --data-items $ITEMS "${TEACHER[@]}" >"$WORK/logs/teacher.log" 2>&1
log "teacher: exit $? ($(grep -h 'teacher done' "$WORK/logs/teacher.log"))"

# --- 2. students (and the teacher's eval images), all at once -----------------------------------------------------
# 12 small launch-bound processes share one GPU, so their speed is known only once they run: a probe reads their
# metrics.jsonl after PROBE s and, if 400 + 1000 steps cannot finish by STUDENT_END, stops them (checkpointed) and
# resumes every one with the same fraction of both phases (logs/rescale.json); a student still training at
# STUDENT_END is stopped and exported as it is ("partial" in logs/status.txt).
mkdir -p "$WORK/pids"
train() {     # NAME ARGS...: one finetune_t2i.py run until STUDENT_END, its timeout's pid in pids/NAME
    local name=$1; shift
    timeout -k 20 "$(left $STUDENT_END)" $PY finetune_t2i.py --preset cifar-teacher --base "$WORK/pipeline" \
        --data "$WORK/data" --out "$WORK/students/$name" "${STEPS[@]}" "$@" >>"$WORK/logs/$name.log" 2>&1 &
    echo $! >"$WORK/pids/$name"
    wait $!
}
student() {   # NAME ADAPT_STEPS ARGS...: train, rescale if the probe says so, export if stopped, eval images
    local name=$1 adapt=$2; shift 2
    local out=$WORK/students/$name sets=(--set yoso_steps=$YOSO)
    [ $adapt -gt 0 ] && sets+=(--set adapt_steps=$adapt)
    train $name "$@" "${sets[@]}"
    local rc=$?
    if [ ! -f "$out/yoso_config.json" ] && [ -f "$WORK/logs/rescale.json" ]; then
        local counts=$($PY -c "import json; r = json.load(open('$WORK/logs/rescale.json')); print(max(1, round($adapt * r['scale'])), max(1, round($YOSO * r['scale'])))")
        local resume=(); ls "$out"/ckpt-* >/dev/null 2>&1 && resume=(--resume)
        log "$name: rescaled to adapt/yoso steps $counts ${resume[*]}"
        train $name "$@" "${resume[@]}" --set adapt_steps=${counts% *} --set yoso_steps=${counts#* }
        rc=$?
    fi
    if [ ! -f "$out/yoso_config.json" ] && ls "$out"/ckpt-* >/dev/null 2>&1; then   # stopped: export its checkpoint
        log "$name: partial (exit $rc, last: $(tail -n1 "$out/metrics.jsonl" 2>/dev/null | cut -c1-70)); exporting"
        timeout -k 5 "$(left $((END - 20)))" $PY finetune_t2i.py --preset cifar-teacher --base "$WORK/pipeline" \
            --data "$WORK/data" --out "$out" "${STEPS[@]}" "$@" --resume --set adapt_steps=1 --set yoso_steps=1 \
            >>"$WORK/logs/$name.log" 2>&1
    fi
    [ -f "$out/yoso_config.json" ] || { log "$name: FAILED (exit $rc), see logs/$name.log"; return; }
    log "$name: trained, $(tail -n1 "$out/metrics.jsonl" | cut -c1-60)"
    timeout -k 5 "$(left)" $PY notebooks/teacher_cifar.py --out "$WORK" --stage generate --device $DEVICE --n $N \
        --teacher-steps --student "$name=$out" >"$WORK/logs/$name-generate.log" 2>&1
    log "$name: images exit $?"
}
probe() {     # after PROBE s (up to 3 x 15 s more until 3/4 of them log): summed speed against the work left
    sleep $PROBE
    $PY - "$WORK" $STUDENT_END $ADAPT $YOSO "${PROBE_FORCE:-}" <<'PYEOF' >>"$WORK/logs/status.txt" 2>&1
import json, os, sys, time
work, end, adapt, yoso, force = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ADAPT_COST = 1 / 3          # an adaption step: one frozen and one trained forward + backward; a YOSO step ~3x that
names = sorted(os.listdir(os.path.join(work, "pids")))          # every student launched, started or not


def last_line(name):        # the newest 10-step window; None before the 2nd (the 1st holds CUDA's warm-up)
    try:
        lines = open(os.path.join(work, "students", name, "metrics.jsonl")).readlines()
        return json.loads(lines[-1]) if len(lines) >= 2 else None
    except (OSError, ValueError):                              # not started, or a line half written
        return None


for attempt in range(4):
    logging = [n for n in names if last_line(n)]
    if 4 * len(logging) >= 3 * len(names) or attempt == 3:
        break
    time.sleep(15)
# conservative on purpose: students not yet logging add work but no speed; the first window includes warm-up
rate, need, seen = 0.0, 0.0, 0
for name in names:
    total_a = 0 if name.startswith("noadapt") else (adapt * 3 if name.startswith("abl-adapt") else adapt)
    last = last_line(name)
    if os.path.isfile(os.path.join(work, "students", name, "yoso_config.json")):
        continue
    if last is None:        # still starting: counts as work, not as speed
        need += total_a * ADAPT_COST + yoso
        continue
    seen += 1
    cost = ADAPT_COST if last["phase"] == "adapt" else 1.0
    rate += last["it_s"] * cost
    done_a = min(last["step"], total_a)
    need += (total_a - done_a) * ADAPT_COST + yoso - (last["step"] - done_a)
left = end - time.time()
fits = rate * left
print(f"[probe] {seen} students running, {rate:.1f} YOSO-step equivalents/s; work left {need:.0f}, "
      f"fits {fits:.0f} in {left:.0f}s")
if (seen and fits < need) or force:
    scale = float(force) if force else max(0.05, min(1.0, rate * (left - 40) / need))   # 40 s: stop, restart, reload
    json.dump({"scale": scale, "rate": rate, "need": need, "left": left}, open(os.path.join(work, "logs", "rescale.json"), "w"))
    print(f"[probe] too slow: every student restarts with {scale:.2f} x its steps")
PYEOF
    if [ -f "$WORK/logs/rescale.json" ]; then
        for f in "$WORK"/pids/*; do kill -TERM "$(cat "$f")" 2>/dev/null; done
    fi
}
if [ -f "$WORK/pipeline/model_index.json" ]; then
    for s in 0 1 2; do
        student paper_s$s $ADAPT --stage all --set seed=$s &
        student released_s$s $ADAPT --stage all --set yoso.rec_weight=released --set seed=$s &
        student noadapt_s$s 0 --stage yoso --set seed=$s &
    done
    student abl-adapt1200 $((3 * ADAPT)) --stage all &
    student abl-kc100 $ADAPT --stage all --set yoso.k_C=100 &
    student abl-ganmean $ADAPT --stage all --set yoso.gan_loss=batch_mean &
    probe &
    # the teacher's rows: 20/4/2/1 steps, a second 20-step draw (the floor), guidance 3 and 4.5 at 20 and 2 steps
    timeout -k 5 "$(left)" $PY notebooks/teacher_cifar.py --out "$WORK" --stage generate --device $DEVICE --n $N \
        --teacher-steps 20 4 2 1 --teacher-cfg 3 4.5 --cfg-steps 20 2 >"$WORK/logs/teacher-generate.log" 2>&1
    log "teacher images: exit $?"
    wait
else
    log "ERROR: no teacher pipeline; students skipped"
fi

# --- 3. pack ----------------------------------------------------------------------------------------------------
log "packing ($(ls "$WORK/samples" 2>/dev/null | wc -l) sample files)"
timeout -k 5 120 $PY notebooks/teacher_cifar.py --out "$WORK" --stage pack --pack-dir "$OUTDIR" \
    >"$WORK/logs/pack.log" 2>&1 || { echo "pack failed:"; cat "$WORK/logs/pack.log"; }
cat "$WORK/logs/pack.log"
log "done"
