#!/usr/bin/env bash
# The GPU questions of issues 15 and 13, answered in ONE call of the device tool (a lent NVIDIA H200).
#
# What it measures, each step under its own `timeout` (a failed step is recorded and the next one runs):
#   install  installs the carried wheels (.whl) into /tmp/site (PYTHONPATH);
#   check    records python, torch, the GPU and the packages' versions (gpu_session.py check); no CUDA, a
#            missing package or missing data skips every later step (recorded, with the reason).
#   fit      issue 15: benchmarks/speed.py --parts fit at 96^3 and 160^3 (whole 160^3 volumes), batch 2,
#            float32 and AMP (--amp both), 2 warm-up + 6 timed iterations each.
#   protect  issue 15: speed.py --parts protect --resume: protect's seconds per case (random, voxshield)
#            against nibabel's read + write, on the carried la_mri cases and the thick-slice phantom.
#   regrid   issue 13: python -m custom.cli regrid --grid 160 of those cases (the authors' grid).
#   paper    issue 13: evaluate --recipe_name paper (UNet 32..512, whole 160^3 volumes, batch 8) with AMP
#            for 4 epochs ONLY. The recipe's 100 epochs do not fit in one call (10 minutes at most): this
#            run measures seconds per epoch, and session.json's paper_victim.estimated_total_s says what
#            100 epochs would take, so that a later session can size (or split) the full victims.
# The steps' caps add up to 540 s (install 45, check 45, fit 120, protect 90, regrid 90, paper 150); expect
# about 5 minutes. Results (6 small files; the tool brings back 8 at most) go to $OUT, copied after every
# step, so a call cut short still returns what was measured:
#   session.json (every step's command, exit code, wall time, limit and peak GPU memory; the device; the
#   paper recipe's seconds per epoch and 100-epoch estimate), session.log (the end of each step's log),
#   speed.json + speed.md (speed.py's record: fit and protect), paper_results.json + paper_results.md
#   (evaluate's results.json and results.md).
#
# ONE-TIME PREPARATION, here, in the checkout the session was started in (the device tool sends that
# checkout, also when a helper calls from another worktree: merge this script there first):
#     bash benchmarks/gpu_session.sh --prepare
# which (1) adds /.whl/ and /.gpu_data/ to git's exclude file ($(git rev-parse --git-path info/exclude));
# (2) downloads the wheels the device lacks (its image has torch 2.11+cu130, numpy, scipy, tensorboard,
# einops, tqdm, pillow, matplotlib, pyyaml, packaging, typing-extensions; not these), pinned as in
# requirements.txt, with the one dependency the device also lacks (fire's termcolor):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#         monai==1.6.1 nibabel==5.4.2 fire==0.7.1 pytorch-ignite==0.5.5 termcolor==3.3.0
# (all pure-Python wheels, 5.2 MiB together; their Requires-Dist: monai torch, numpy; nibabel numpy,
# packaging; pytorch-ignite torch, packaging; fire termcolor; termcolor none. itk is not needed: nothing
# in custom/, configs/ or benchmarks/ imports it, the data are read with nibabel; jsonschema only serves
# `monai.bundle verify_metadata`, which no step runs);
# (3) copies la_mri's 80 training cases and its first 4 test cases (GPU_SESSION_TEST_CASES) from
# ../shared/data/la_mri (GPU_SESSION_LA_MRI), which does not travel, into .gpu_data/la_mri (43.9 MiB;
# all 100 cases, 52.3 MiB, would leave about 1 MiB of the 64 MiB as the repository grows); (4) prints what
# the call will send (tracked + untracked-not-ignored files + .whl + .gpu_data: 5.3 + 5.2 + 43.9 = 54.4 MiB
# on 2026-11-30) and fails above 64 MiB. Delete .whl and .gpu_data after the session.
#
# THE DEVICE CALL (one; the machine's start takes 1-2 of the session's 15 device minutes):
#     run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".gpu_data"], timeout_s=600)
# A full call leaves about 4 minutes, too few to start another machine: to rerun failed steps, call again
# at once, while the machine is warm (30 s after a call), e.g. command="GPU_SESSION_STEPS=regrid,paper bash
# benchmarks/gpu_session.sh" (a regridded copy still in /tmp is reused); otherwise give_back. Afterwards copy the files from the reply's files_at into benchmarks/results/gpu/ (session.json,
# speed.json, speed.md, paper_results.json, paper_results.md; session.log only to read) and commit them.
#
# DRY RUN (here, on the CPU, no wheels, no GPU): the same steps on the demo phantom (6 cases, 32x32x16,
# an MSD copy with training and test lists) at tiny sizes: fit at 32^3 with --amp both, 1 + 1
# iterations; protect on 2 cases and a 1-case phantom; regrid to 32^3; the paper recipe for 2 epochs.
#     OUT=/tmp/out GPU_SESSION_DRY_RUN=1 bash benchmarks/gpu_session.sh     # or: bash ... --dry-run
# tests/test_gpu_session.py runs it end to end.
#
# Environment: OUT (required, the tool sets it), PYTHON (default python3), GPU_SESSION_WORK (default
# /tmp/voxshield_gpu_session), GPU_SESSION_STEPS (default fit,protect,regrid,paper), GPU_SESSION_DATA
# (default .gpu_data/la_mri), GPU_SESSION_WHEELS (default .whl), GPU_SESSION_THREADS (default all cores;
# 1 in a dry run), GPU_SESSION_PAPER_EPOCHS (default 4; 2 in a dry run).

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

prepare() {
    local exclude source tests
    exclude=$(git rev-parse --git-path info/exclude) || return 1
    mkdir -p "$(dirname "$exclude")"
    for entry in /.whl/ /.gpu_data/; do
        grep -qxF "$entry" "$exclude" 2>/dev/null || echo "$entry" >>"$exclude"
    done
    local pins
    pins=$(grep -E '^(monai|nibabel|fire|pytorch-ignite)==' requirements.txt | tr '\n' ' ')
    rm -rf .whl && mkdir -p .whl
    # shellcheck disable=SC2086  # the pins are separate words
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins termcolor==3.3.0 || return 1
    source=${GPU_SESSION_LA_MRI:-../shared/data/la_mri}
    tests=${GPU_SESSION_TEST_CASES:-4}
    rm -rf .gpu_data && mkdir -p .gpu_data
    "$PYTHON" benchmarks/gpu_session.py subset "$source" .gpu_data/la_mri --training 80 --test "$tests" || return 1
    "$PYTHON" benchmarks/gpu_session.py travel_size .whl .gpu_data
}

if [[ "${1:-}" == "--prepare" ]]; then
    prepare
    exit $?
fi
DRY_RUN=${GPU_SESSION_DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
: "${OUT:?set OUT to the folder that takes the results (the device tool sets it)}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_SESSION_WORK:-/tmp/voxshield_gpu_session}
mkdir -p "$WORK/logs"
WORK=$(cd "$WORK" && pwd)
rm -f "$WORK/steps.tsv" "$WORK"/logs/*
STEPS=${GPU_SESSION_STEPS:-fit,protect,regrid,paper}

if [[ "$DRY_RUN" == 1 ]]; then
    MODE=dry-run
    THREADS=${GPU_SESSION_THREADS:-1}
    EPOCHS=${GPU_SESSION_PAPER_EPOCHS:-2}
    GRID=32
    FIT_ARGS=(--patch_sizes 32 --warmup 1 --iterations 1)
    PROTECT_ARGS=(--cases 2 --thick_cases 1 --thick_shape 32,32,10 --thick_slice_mm 5)
    export OMP_NUM_THREADS=$THREADS
else
    MODE=gpu
    THREADS=${GPU_SESSION_THREADS:-$(nproc)}
    EPOCHS=${GPU_SESSION_PAPER_EPOCHS:-4}
    GRID=160
    FIT_ARGS=(--patch_sizes 96,160 --warmup 2 --iterations 6)
    PROTECT_ARGS=()
fi
echo "gpu_session: $MODE, steps $STEPS, work $WORK, results $OUT"

# run_step NAME LIMIT_S COMMAND...: the command under `timeout`, its output in WORK/logs/NAME.log (the end
# printed and kept in OUT/session.log), its exit code and wall time in WORK/steps.tsv; on a GPU,
# nvidia-smi samples the memory used meanwhile (WORK/logs/NAME.gpumem).
run_step() {
    local name=$1 limit=$2 start code sampler=""
    shift 2
    printf '%q ' "$@" >"$WORK/logs/$name.cmd"
    echo "== $name (at most ${limit} s): $(cat "$WORK/logs/$name.cmd")"
    if [[ "$MODE" == gpu ]] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$WORK/logs/$name.gpumem" 2>/dev/null &
        sampler=$!
    fi
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
    code=$?
    [[ -n "$sampler" ]] && { kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; }
    awk -v name="$name" -v code="$code" -v start="$start" -v end="$(date +%s.%N)" -v limit="$limit" \
        'BEGIN { printf "%s\t%s\t%.1f\t%s\n", name, code, end - start, limit }' >>"$WORK/steps.tsv"
    { echo "===== $name: exit $code; the end of its log"; tail -n 60 "$WORK/logs/$name.log"; } >>"$OUT/session.log"
    tail -n 15 "$WORK/logs/$name.log"
    echo "== $name: exit code $code"
    return "$code"
}

skip_step() {  # skip_step NAME REASON
    printf '%s\tskipped\t%s\t\n' "$1" "$2" >>"$WORK/steps.tsv"
    echo "== $1: skipped ($2)"
}

wanted() { [[ ",$STEPS," == *",$1,"* ]]; }

collect() {  # the results measured so far into OUT
    local pair
    for pair in "speed/speed.json:speed.json" "speed/speed.md:speed.md" "paper/results.json:paper_results.json" \
        "paper/results.md:paper_results.md"; do
        [[ -f "$WORK/${pair%%:*}" ]] && cp "$WORK/${pair%%:*}" "$OUT/${pair##*:}"
    done
    return 0
}

: >"$OUT/session.log"
if [[ "$MODE" == gpu ]]; then
    DATA=${GPU_SESSION_DATA:-.gpu_data/la_mri}
    WHEELS=${GPU_SESSION_WHEELS:-.whl}
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        run_step install 45 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        skip_step install "no wheels in $WHEELS: carry .whl (see the header)"
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv |
        tee -a "$OUT/session.log"
    run_step check 45 "$PYTHON" benchmarks/gpu_session.py check "$WORK/device.json" --require_cuda
    READY=$?
else
    DATA=${GPU_SESSION_DATA:-}
    if [[ -z "$DATA" ]]; then
        run_step demo 120 "$PYTHON" benchmarks/gpu_session.py demo "$WORK/demo" && DATA=$WORK/demo/data
    fi
    run_step check 45 "$PYTHON" benchmarks/gpu_session.py check "$WORK/device.json"
    READY=$?
fi
if [[ "$READY" == 0 && ! -f "$DATA/dataset.json" ]]; then
    echo "gpu_session: no dataset at '$DATA' (carry .gpu_data: see the header)"
    READY=2
fi

SPEED=(benchmarks/speed.py --data "$DATA" --results_dir "$WORK/speed" --threads "$THREADS")
GRID_DIR=$WORK/la_mri_grid$GRID
for step in fit protect regrid paper; do
    wanted "$step" || continue
    if [[ "$READY" != 0 ]]; then
        skip_step "$step" "setup failed (exit $READY)"
        continue
    fi
    case $step in
        fit) run_step fit 120 "$PYTHON" "${SPEED[@]}" --parts fit --resume --amp both "${FIT_ARGS[@]}" ;;
        protect) run_step protect 90 "$PYTHON" "${SPEED[@]}" --parts protect --resume "${PROTECT_ARGS[@]}" ;;
        regrid)
            if [[ -f "$GRID_DIR/dataset.json" ]]; then
                skip_step regrid "reused $GRID_DIR (regrid writes it complete or not at all)"
            else
                run_step regrid 90 "$PYTHON" -m custom.cli regrid --source "$DATA" --output "$GRID_DIR" --grid "$GRID"
            fi ;;
        paper)
            if [[ ! -f "$GRID_DIR/dataset.json" ]]; then
                skip_step paper "no regridded copy"
                continue
            fi
            rm -rf "$WORK/paper"
            run_step paper 150 "$PYTHON" -m custom.cli evaluate --bundle brats --train_dir "$GRID_DIR" \
                --test_dir "$GRID_DIR" --output_dir "$WORK/paper" --recipe_name paper --epochs "$EPOCHS" \
                --method clean --amp true ;;
    esac
    collect
done

"$PYTHON" benchmarks/gpu_session.py summarize "$WORK" "$OUT" --mode "$MODE" || echo "gpu_session: summarize failed"
echo "gpu_session: results in $OUT:"
ls -l "$OUT"
grep -c $'\t0\t' "$WORK/steps.tsv" | xargs -I{} echo "gpu_session: {} step(s) exited 0"
! grep -qvE $'\t(0|skipped)\t' "$WORK/steps.tsv"
