#!/usr/bin/env bash
# The one-shot GPU proof (issue 17): everything a lent GPU should tell us, in one prepared call.
#
#   bash bench/gpu_proof.sh              # on the GPU machine: wheels/ carried, results in $OUT
#   bash bench/gpu_proof.sh --dry-run    # anywhere: the plan (steps, budgets, commands), pins checked offline
#   bash bench/gpu_proof.sh --dry-run --check-index   # + the pins resolved against the package index
#   bash bench/gpu_proof.sh --only install,pytest_gpu # a rerun of some steps
#   bash bench/gpu_proof.sh --steps-file FILE         # other steps: lines of NAME|BUDGET_S|COMMAND
#
# The lent machine (one H200, Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, accelerate,
# peft, safetensors) has no bitsandbytes, pydantic, datasets or trl, and a session gets 15 minutes
# of it, start-up included: the wheels in bench/wheels.txt travel in wheels/ (README.md, "The
# one-shot GPU proof"), and every step runs under `timeout` with its own budget, the budgets
# summing to at most 8 minutes, so one call fits with time left to read the results. A step that
# runs out of time or fails is recorded and the next one runs: one bad step never costs the rest.
# The order is the order of value: the GPU tests, then the plan proof (8B, then 70B, each its own
# step), then the TRL comparison, and each step's results land in $OUT the moment it ends, so a
# call cut short (the lent machine's time limit) still brings back every step that finished.
#
# $OUT gets (few files: a lent machine's call brings back at most 8; the dry run counts them):
#   STEP.json       per step, written (atomically) as it ends: {"step", "budget_s", "wall_s", "rc",
#                   "timed_out", "last_line", "records": [every JSON line the step printed]}
#   results.jsonl   the same, one line per step, then each record tagged with its step, appended
#                   as each step ends
#   gpu_proof.log   everything the steps printed, step by step, written as they print it
#   pytest_gpu.xml  the GPU tests' JUnit report
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$ROOT/wheels}"
SITE="${SITE:-/tmp/qlora-gpu-proof-site}"
PYTHON="${PYTHON:-python3}"
TOTAL_BUDGET_S=480 # 8 of the session's 15 device minutes: start-up and a look at the results need the rest
MAX_FILES_BACK=8   # files a lent machine's call brings back from $OUT

DRY_RUN=0
CHECK_INDEX=0
ONLY=""
STEPS_FILE=""
while (($#)); do
    arg=$1
    shift
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --check-index) CHECK_INDEX=1 ;;
        --only)
            ONLY=",${1:-},"
            shift
            ;;
        --steps-file)
            STEPS_FILE=${1:-}
            shift
            [[ -f $STEPS_FILE ]] || {
                echo "error: --steps-file: no such file: ${STEPS_FILE:-(none given)}" >&2
                exit 2
            }
            ;;
        -h | --help)
            sed -n '2,10p' "$0"
            exit 0
            ;;
        *)
            echo "error: unknown argument $arg (expected --dry-run, --check-index, --only STEP,..., --steps-file FILE)" >&2
            exit 2
            ;;
    esac
done
if [[ $CHECK_INDEX == 1 && $DRY_RUN == 0 ]]; then
    echo "error: --check-index goes with --dry-run (the GPU machine reaches no index)" >&2
    exit 2
fi

# name | budget in seconds | command, in the order they run. The plan proof's 70B base is ~35 GiB
# in NF4, built on the GPU one linear at a time (model.init: random), so the whole 80-layer shape
# runs; it is a step of its own after the 8B, so a 70B that overruns costs neither the 8B's
# numbers nor the comparison. The TRL comparison's 8B base must exist as weights for TRL to load,
# so compare.py writes a random 8B in bf16 (~16 GB on disk) once and every run loads it.
STEPS=(
    "install|40|$PYTHON -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $WHEELS/*.whl && $PYTHON bench/gpu_env.py"
    "pytest_gpu|90|$PYTHON -m pytest -q -m gpu -p no:cacheprovider --junitxml=\$OUT/pytest_gpu.xml tests/test_gpu.py"
    "plan_proof_8b|70|$PYTHON bench/plan_proof.py --models llama-3.1-8b --seq-len 2048 --steps 4"
    "plan_proof_70b|110|$PYTHON bench/plan_proof.py --models llama-3.3-70b --seq-len 2048 --steps 4"
    "compare_8b|170|$PYTHON bench/compare.py --arch llama-3.1-8b --runs ours trl-default trl-best --steps 6 --batch 4 --micro-batch 2 --max-seq-len 512 --train-rows 64 --eval-rows 8"
)
if [[ -n $STEPS_FILE ]]; then
    mapfile -t STEPS < <(grep -vE '^\s*(#|$)' "$STEPS_FILE")
fi

check_pins() {
    # Offline: every line of bench/wheels.txt is NAME==VERSION, each name once.
    local bad
    bad=$(grep -vE '^\s*(#|$)' "$ROOT/bench/wheels.txt" | grep -vE '^[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+\s*$' || true)
    if [[ -n $bad ]]; then
        echo "error: bench/wheels.txt: not NAME==VERSION: $bad" >&2
        return 1
    fi
    local twice
    twice=$(grep -vE '^\s*(#|$)' "$ROOT/bench/wheels.txt" | cut -d= -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
    if [[ -n $twice ]]; then
        echo "error: bench/wheels.txt: named twice: $twice (two versions stop the whole install)" >&2
        return 1
    fi
    echo "pins: $(grep -cvE '^\s*(#|$)' "$ROOT/bench/wheels.txt") in bench/wheels.txt, each NAME==VERSION, each once"
}

check_index() {
    # Resolve the pins for the lent machine (CPython 3.12, manylinux x86_64) against the index;
    # --dry-run with --target installs nothing and writes nothing.
    local report
    report=$("$PYTHON" -m pip install --dry-run --ignore-installed --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
        --target "$(mktemp -d)/never-written" -r "$ROOT/bench/wheels.txt" 2>&1)
    if ! grep -q '^Would install' <<<"$report"; then
        echo "error: the pins do not resolve for cp312 manylinux x86_64: $(grep -m1 ERROR <<<"$report")" >&2
        return 1
    fi
    echo "index: $(grep '^Would install' <<<"$report")"
}

check_wheels() {
    # Offline: which pins already have their wheel in $WHEELS (the folder that travels).
    [[ -d $WHEELS ]] || {
        echo "wheels: $WHEELS not downloaded yet (README.md, \"The one-shot GPU proof\")"
        return 0
    }
    local missing=()
    while IFS='=' read -r name _ version; do
        local file=${name//-/_}
        compgen -G "$WHEELS/${file}-${version}-*.whl" >/dev/null || compgen -G "$WHEELS/${name}-${version}-*.whl" >/dev/null ||
            missing+=("$name==$version")
    done < <(grep -vE '^\s*(#|$)' "$ROOT/bench/wheels.txt")
    if ((${#missing[@]})); then
        echo "wheels: missing from $WHEELS: ${missing[*]}"
    else
        echo "wheels: every pin is in $WHEELS ($(du -sh "$WHEELS" | cut -f1))"
    fi
    # The full bitsandbytes wheel (~43 MB) would eat most of the 64 MiB a device call carries.
    local wheel
    for wheel in "$WHEELS"/bitsandbytes-*.whl; do
        [[ -f $wheel ]] || continue
        if (($(stat -c %s "$wheel") > 10 * 1024 * 1024)); then
            echo "error: $wheel is $(($(stat -c %s "$wheel") / 1048576)) MiB, not slimmed: python bench/slim_wheel.py $wheel" >&2
            return 1
        fi
    done
}

if [[ $DRY_RUN == 1 ]]; then
    total=0
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name budget command <<<"$step"
        if ! [[ $name =~ ^[a-z0-9_]+$ && $budget =~ ^[0-9]+$ && $budget -gt 0 && -n $command ]]; then
            echo "error: step '$step': not NAME|BUDGET_S|COMMAND (name in a-z0-9_, budget > 0)" >&2
            exit 1
        fi
        total=$((total + budget))
        echo "step $name: budget ${budget}s: $command"
    done
    echo "total budget: ${total}s of ${TOTAL_BUDGET_S}s"
    # A STEP.json per step, results.jsonl, gpu_proof.log and pytest_gpu.xml.
    files_back=$((${#STEPS[@]} + 3))
    echo "files back: ${files_back} of ${MAX_FILES_BACK}"
    if ((files_back > MAX_FILES_BACK)); then
        echo "error: ${files_back} files in \$OUT, over the ${MAX_FILES_BACK} a lent machine's call brings back" >&2
        exit 1
    fi
    check_pins || exit 1
    check_wheels || exit 1
    if [[ $CHECK_INDEX == 1 ]]; then
        check_index || exit 1
    fi
    if ((total > TOTAL_BUDGET_S)); then
        echo "error: the steps' budgets sum to ${total}s, over ${TOTAL_BUDGET_S}s" >&2
        exit 1
    fi
    exit 0
fi

if [[ -z ${OUT:-} ]]; then
    echo "error: OUT is not set (the folder the results go to)" >&2
    exit 2
fi
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "error: no wheels in $WHEELS: download them first (README.md, \"The one-shot GPU proof\")" >&2
    exit 2
fi
mkdir -p "$OUT"
cd "$ROOT" || exit 2
export PYTHONPATH="$SITE:$ROOT" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OUT
RESULTS="$OUT/results.jsonl"
LOG="$OUT/gpu_proof.log"
SCRATCH=$(mktemp -d) # a step's output while it runs: not in $OUT, whose files are counted
trap 'rm -rf "$SCRATCH"' EXIT
: >"$RESULTS"
: >"$LOG"
status=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name budget command <<<"$step"
    [[ -n $ONLY && $ONLY != *",$name,"* ]] && continue
    printf '\n===== %s (budget %ss): %s\n' "$name" "$budget" "$command" >>"$LOG"
    started=$(date +%s.%N)
    # --kill-after: a step that ignores SIGTERM still ends, 10 s later. tee: the log holds what a
    # step printed even if the whole call is cut short in the middle of it.
    timeout --kill-after=10 "$budget" bash -c "$command" 2>&1 | tee -a "$LOG" >"$SCRATCH/step.out"
    rc=${PIPESTATUS[0]}
    wall=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    # The step's record with each JSON line it printed (the benches print one per run): STEP.json
    # by rename (never half-written), and the same appended to results.jsonl.
    "$PYTHON" - "$name" "$budget" "$wall" "$rc" "$SCRATCH/step.out" "$OUT" >>"$RESULTS" <<'PY'
import json, os, sys
name, budget, wall, rc, printed, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
lines = open(printed, errors="replace").read().splitlines()
last = next((line for line in reversed(lines) if line.strip()), "")
records = []
for line in lines:
    try:
        record = json.loads(line)
    except ValueError:
        continue
    if isinstance(record, dict):
        records.append(record)
summary = {"step": name, "budget_s": budget, "wall_s": wall, "rc": rc, "timed_out": rc in (124, 137),
           "last_line": last[:500]}
with open(os.path.join(out, f".{name}.json.part"), "w") as handle:
    json.dump({**summary, "records": records}, handle, indent=1)
os.replace(os.path.join(out, f".{name}.json.part"), os.path.join(out, f"{name}.json"))
print(json.dumps(summary))
for record in records:
    print(json.dumps({"from_step": name, **record}))
PY
    tail -n 3 "$SCRATCH/step.out" | sed "s/^/  $name: /"
    echo "step $name: rc $rc in ${wall}s (budget ${budget}s)"
    [[ $rc != 0 ]] && status=1
    [[ $name == install && $rc != 0 ]] && break # nothing after it can import
done
exit $status
