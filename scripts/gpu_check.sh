#!/usr/bin/env bash
# The device check: what only a GPU can tell us, in one short run on a lent GPU machine (no network, no Hydra).
#
#   bash scripts/gpu_check.sh [--budget-s SECONDS] [--dry-run]
#
# 1. Installs Hydra and its dependencies from gpu-wheels/ (`make gpu-wheels` on a connected machine) into a
#    private folder and puts the repo on PYTHONPATH: nothing from the network, nothing into the image.
# 2. Prints versions, then runs each step only if its estimate fits the time left of the budget (default 480 s),
#    so no step is cut off midway: (a) pytest -m gpu, (b) the gpu_check suite and its report (narrowed to
#    softmax if the whole suite would not fit), (c) scripts/gpu_summary.py.
# 3. Leaves under $OUT (a temp folder if unset): gpu_check.log (this output), versions.txt, pytest.log,
#    results.tar.gz (rows + report) and gpu_summary.txt.
#
# --dry-run runs the same steps on a CPU (Triton's interpreter, .venv's python if there is one, toy shapes) in
# about a minute, so that this script and the summary cannot rot between the days a GPU is lent (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash scripts/gpu_check.sh [--budget-s SECONDS] [--dry-run]"
budget=480
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --budget-s) budget="${2:-}"; shift ;;
        --budget-s=*) budget="${1#*=}" ;;
        -h | --help) echo "$usage"; exit 0 ;;
        *) echo "error: unknown argument '$1'; $usage" >&2; exit 2 ;;
    esac
    shift
done
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "error: --budget-s takes whole seconds, got '$budget'" >&2; exit 2; }

# Wheels first: without them nothing below can run, and the fix is on another machine.
for wheel in hydra_core omegaconf antlr4_python3_runtime pyyaml; do
    compgen -G "gpu-wheels/${wheel}-*.whl" >/dev/null || {
        echo "error: gpu-wheels/ has no $wheel wheel: run 'make gpu-wheels' on a machine with network, then bring gpu-wheels/ along" >&2
        exit 2
    }
done

OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
work="$(mktemp -d -t gpu_check_work.XXXXXX)"
trap 'rm -rf "$work"' EXIT
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
start=$SECONDS

if [ "$dry" -eq 1 ]; then
    PY=python3
    [ -x .venv/bin/python ] && PY=.venv/bin/python
    export TRITON_INTERPRET=1
    device=cpu
    # Seconds per step or per cell, from runs of this script; the log prints the real times to update them.
    est_tests=20 est_cell=1 est_suite_fixed=30 est_summary=10
    # gpu_check itself (its methods and blocks) at one toy length: ~70 cells, under a minute interpreted.
    suite_args=(suite=gpu_check task=scaling 'task.seq_len=[128]' task.tokens=null task.heads=2 task.head_dim=32
                +timing.warmup=1 +timing.min_time_s=0 +timing.min_repeats=2 +timing.max_repeats=2)
else
    PY=python3
    export TRITON_INTERPRET=0  # tests/conftest.py would default it to 1 (the CPU suite's interpreter)
    device=cuda
    # Guesses until a GPU run measures them: ~100 kernel tests, each compiling; per cell the inputs, the fp64
    # oracle, timing and memory, and a torch.compile per FlexAttention shape.
    est_tests=180 est_cell=2 est_suite_fixed=60 est_summary=20
    suite_args=(suite=gpu_check)
fi
export MPLBACKEND=Agg

echo "gpu_check: $([ "$dry" -eq 1 ] && echo dry run || echo GPU run), budget ${budget}s, python $PY, OUT=$OUT"

# --- install: the wheels into a private folder (pip; if pip cannot, unzip them: each PyYAML wheel adds its CPython's
# extension, and PyYAML runs as pure Python without one) ---
site="$work/site"
if ! "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --find-links gpu-wheels \
    --target "$site" hydra-core omegaconf antlr4-python3-runtime PyYAML 2>"$work/pip.err"; then
    echo "pip could not install gpu-wheels/ ($(tail -n 1 "$work/pip.err")); unpacking the wheels instead"
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$site" gpu-wheels/*.whl
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"

# --- versions ---
"$PY" - "$device" <<'EOF' | tee "$OUT/versions.txt"
import platform
import sys

import hydra
import omegaconf
import torch

print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import triton

    print(f"triton {triton.__version__}")
except ImportError as err:
    print(f"triton: not importable ({err})")
print(f"hydra {hydra.__version__}, omegaconf {omegaconf.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
elif sys.argv[1] == "cuda":
    sys.exit("error: no CUDA device here; on a CPU run `bash scripts/gpu_check.sh --dry-run`")
else:
    print("device: none (dry run on the CPU)")
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/versions.txt"
fi

# --- steps, each started only if its estimate fits what is left ---
failed=()
report=()
left() { echo $((budget - (SECONDS - start))); }

step() {  # step NAME ESTIMATE_S COMMAND...: run it if it fits, record how it went
    local name="$1" estimate="$2" t0=$SECONDS
    shift 2
    if [ "$estimate" -gt "$(left)" ]; then
        echo "== $name: skipped (needs ~${estimate}s, $(left)s left)"
        report+=("$name skipped")
        return 0
    fi
    echo "== $name (estimate ${estimate}s, $(left)s left)"
    if "$@"; then
        report+=("$name ok in $((SECONDS - t0))s")
    else
        report+=("$name FAILED (exit $?) in $((SECONDS - t0))s")
        failed+=("$name")
    fi
}

run_tests() {
    local rc=0
    "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider tests >"$OUT/pytest.log" 2>&1 || rc=$?
    tail -n 5 "$OUT/pytest.log"
    return "$rc"
}

count_cells() {  # the cells `python -m bench.run ARGS...` would measure (not the unsupported): the suite's estimate
    "$PY" - "$device" "$@" <<'EOF'
import sys

import torch
from hydra import compose, initialize_config_dir

import bench.run  # noqa: F401 - registers the run_id resolver the config uses
from bench.plan import CONF_DIR, plan_cells
from methods import Unsupported, get_impl

device, overrides = torch.device(sys.argv[1]), sys.argv[2:]
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides=overrides)
cli_keys = tuple(o.split("=", 1)[0].removeprefix("task.") for o in overrides if o.startswith("task."))
measured = 0
for cell in plan_cells(cfg, device, "", cli_keys):
    p = cell.point
    try:  # what the scaling task checks first: an unsupported cell costs nothing
        get_impl(cell.method, cell.impl).capabilities.check(
            causal=bool(p["causal"]), cross=p["seq_len"] != p["kv_len"], mode=p["mode"], dtype=p["dtype"])
        measured += 1
    except Unsupported:
        pass
print(measured)
EOF
}

run_suite() {
    "$PY" -m bench.run "$@" device="$device" results_dir="$work/results" report=true
}

step "tests (pytest -m gpu)" "$est_tests" run_tests

# The whole suite if it fits, else softmax alone (kernel next to its peers), else nothing.
for narrow in "" method=softmax; do
    args=("${suite_args[@]}" ${narrow:+"$narrow"})
    cells="$(count_cells "${args[@]}")" || { failed+=("suite plan"); report+=("suite plan FAILED"); break; }
    estimate=$((est_suite_fixed + cells * est_cell))
    if [ "$estimate" -le "$(left)" ] || [ -n "$narrow" ]; then
        step "suite gpu_check ${narrow:-(all)}: $cells timed cells" "$estimate" run_suite "${args[@]}"
        break
    fi
    echo "== suite gpu_check (all): $cells cells need ~${estimate}s, $(left)s left: narrowing to softmax"
done

if [ -d "$work/results" ]; then
    step "summary" "$est_summary" "$PY" scripts/gpu_summary.py "$work/results" --out "$OUT/gpu_summary.txt"
    tar -czf "$OUT/results.tar.gz" -C "$work" results
fi

echo "== gpu_check done in $((SECONDS - start))s"
printf '   %s\n' "${report[@]}"
echo "== under $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
[ ${#failed[@]} -eq 0 ] || { echo "== failed: ${failed[*]}"; exit 1; }
