#!/usr/bin/env bash
# The one command to hand a GPU machine: under 8 minutes, every part under its own time limit.
#
#   bash benchmarks/device_check.sh [--summary FILE] [PART ...]
#
# Parts, in order (all three unless some are named; each runs even if one before it failed):
#   1. tests   pytest -q -rs of the core tests (those of CORE_TESTS that exist)      <= 150 s
#   2. bench   python benchmarks/gpu.py --json gpu.json (on a machine without CUDA:  <= 270 s
#              --quick --device cpu, a smoke check)
#   3. fsdp    pytest -q -rs tests/test_fsdp.py (gloo on the CPU; its nccl cases     <= 45 s
#              need 2 GPUs and skip on one)
# FILE (default $OUT/device_check.txt if $OUT is set, else ./device_check.txt) gets nvidia-smi
# at the top, then every part's command, exit status, seconds and the last lines of its output;
# each part's whole output and gpu.json go beside it. Exits 1 if any part failed, else 0.
#
# Fetches nothing (a GPU machine may be offline): it uses .venv if there is one, else python3 as
# it is, with src/ on PYTHONPATH, and stops at once if that cannot import torch and pytest.
# Wheels found in .whl/ are installed into a temporary folder first, without their dependencies:
# that is how pytorch-optimizer reaches an offline machine (its rows are left out without it;
# a wheel that does not install stops the check with exit 2 before any part runs):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl pytorch-optimizer==4.1.0
# Optuna is not needed.
set -u

summary=${OUT:+$OUT/}device_check.txt
parts=()
while [ $# -gt 0 ]; do
    case $1 in
        --summary)
            [ $# -ge 2 ] || { echo "device_check: --summary needs a file name" >&2; exit 2; }
            summary=$2
            shift 2
            ;;
        tests | bench | fsdp)
            parts+=("$1")
            shift
            ;;
        *)
            echo "device_check: unknown argument '$1': name parts among tests, bench and fsdp," \
                "or --summary FILE" >&2
            exit 2
            ;;
    esac
done
[ ${#parts[@]} -gt 0 ] || parts=(tests bench fsdp)
wanted() { [[ " ${parts[*]} " == *" $1 "* ]]; }
mkdir -p "$(dirname "$summary")" || exit 2
summary=$(cd "$(dirname "$summary")" && pwd)/$(basename "$summary")

cd "$(dirname "$0")/.." || exit 2
root=$(pwd)
logs=${summary%.txt}
start=$SECONDS
failed=0
TAIL_LINES=40
CORE_TESTS="test_math test_modes test_mode_state test_batchnorm test_safety test_state
test_foreach test_compile test_amp test_ascent_fraction test_syncs"

if [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
python=$(command -v python || command -v python3)
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
wheels=(.whl/*.whl)
if [ -e "${wheels[0]}" ]; then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" \
        || { echo "device_check: could not install ${wheels[*]}" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:$site"
fi

{
    echo "device_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null \
        || echo 'no git'), python $python, parts: ${parts[*]}"
    [ -z "${site:-}" ] || echo "installed from .whl/: ${wheels[*]##*/}"
    echo "== nvidia-smi =="
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
} >"$summary"

# part NAME LIMIT_SECONDS COMMAND...: run it under timeout, log all of it, summarize its tail.
part() {
    local name=$1 limit=$2
    shift 2
    local log="$logs.$name.log" began=$SECONDS rc
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || failed=1
    {
        echo
        echo "== $name: rc $rc$([ "$rc" -eq 124 ] && echo " (timed out after $limit s)"), \
$((SECONDS - began)) s, limit $limit s =="
        echo "\$ $*"
        tail -n "$TAIL_LINES" "$log"
    } >>"$summary"
}

if ! "$python" -c "import torch, pytest" >/dev/null 2>&1; then
    echo "device_check: $python cannot import torch and pytest; install them first" \
        "(pip install torch -e \".[test,bench]\")" | tee -a "$summary" >&2
    exit 2
fi

if wanted tests; then
    tests=()
    for name in $CORE_TESTS; do
        [ -f "tests/$name.py" ] && tests+=("tests/$name.py")
    done
    part tests 150 "$python" -m pytest -q -rs -p no:cacheprovider "${tests[@]}"
fi

if wanted bench; then
    bench=(benchmarks/gpu.py --json "$logs.gpu.json")
    # Without CUDA, the benchmark's smoke run: it checks the code paths, it measures nothing.
    "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1 \
        || bench+=(--quick --device cpu)
    part bench 270 "$python" "${bench[@]}"
fi

if wanted fsdp; then
    part fsdp 45 "$python" -m pytest -q -rs -p no:cacheprovider tests/test_fsdp.py
fi

echo >>"$summary"
echo "== total $((SECONDS - start)) s; $([ $failed -eq 0 ] && echo 'every part passed' \
    || echo 'FAILED: see the rc lines above') ==" >>"$summary"
echo "device_check: summary in $summary"
exit $failed
