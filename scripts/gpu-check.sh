#!/usr/bin/env bash
# The GPU figures in one go, at any commit: the test suite on CUDA (with the sync guard), then
# vlprune-bench for llava15 (batch 1 and 8), llava-next and qwen2_5_vl in bf16, judged against issue #15's
# targets (scripts/bench_targets.py). Everything it prints
# lands in $OUT (default ./gpu-check-out): one summary and one tarball, small enough for a device run.
#
#   scripts/gpu-wheels.sh                 # here, with PyPI: wheels the GPU image lacks -> .gpu-wheels/
#   VLPRUNE_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu-check.sh    # there, .gpu-wheels carried
#
# The defaults fit one device command (600 s): 200 s for the suite, 90 s per benchmark.
# Knobs: DEVICE (cuda), SUITE_TIMEOUT (200 s), SUITE_ARGS (extra pytest arguments, e.g. -k contract),
# BENCH_TIMEOUT (90 s each), QUICK=1 (small benchmarks, for a dry run on a CPU), PYTHON.
# Python runs with -P, so the installed vlprune is what runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
DEVICE=${DEVICE:-cuda}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-200}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-90}
SITE=${SITE:-/tmp/vlprune-site}
mkdir -p "$OUT/gpu-check"
LOG="$OUT/gpu-check"
PY=${PYTHON:-python3}

# -- install (no network): carried wheels (transformers >= 5.24 and what it needs), then this tree, editable
#    so that the README checks find it; a machine without PEP 660 setuptools gets a plain copy instead ------
if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-deps --no-index .gpu-wheels/*.whl >"$LOG/install.txt" 2>&1
fi
if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG/install.txt" 2>&1; then
    $PY -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" . >>"$LOG/install.txt" 2>&1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "editable install failed (see install.txt): a copy in $SITE; README checks will not find the README" \
        | tee -a "$LOG/summary.txt"
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "commit: ${VLPRUNE_COMMIT:-unknown}"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -P -c "import torch, transformers, vlprune; print('torch', torch.__version__, '| transformers', transformers.__version__, '| vlprune from', vlprune.__file__)"
} >"$LOG/device.txt" 2>&1
cat "$LOG/device.txt"

# -- the suite on the device: every model and input there; the sync test adds the CUDA sync guard ----------
start=$(date +%s)
VLPRUNE_TEST_DEVICE=$DEVICE timeout "$SUITE_TIMEOUT" $PY -P -m pytest tests -q -rs -p no:cacheprovider \
    --continue-on-collection-errors ${SUITE_ARGS:-} >"$LOG/pytest.txt" 2>&1
echo "suite: exit $? in $(( $(date +%s) - start )) s; $(tail -n 1 "$LOG/pytest.txt")" | tee -a "$LOG/summary.txt"

# -- the benchmarks (bf16 on a GPU); each is cut off at BENCH_TIMEOUT ---------------------------------------
bench() {  # name, then vlprune-bench arguments
    local name=$1; shift
    local extra=""
    [ "${QUICK:-0}" = 1 ] && extra="--quick"
    start=$(date +%s)
    timeout "$BENCH_TIMEOUT" $PY -P -m vlprune.eval.bench --device "$DEVICE" --output "$LOG/$name" $extra "$@" \
        >"$LOG/$name.txt" 2>&1
    echo "bench $name: exit $? in $(( $(date +%s) - start )) s" | tee -a "$LOG/summary.txt"
}
dtype=bfloat16
[ "$DEVICE" = cpu ] && dtype=float32
bench llava15-b1 --geometry llava15 --dtype $dtype
bench llava15-b8 --geometry llava15 --dtype $dtype --batch 8 --keeps 64 --repeats 5 --new-tokens 4
bench llava-next --geometry llava-next --dtype $dtype
bench qwen2_5_vl --geometry qwen2_5_vl --dtype $dtype

# -- issue #15's speed targets, judged from what the benchmarks wrote (PASS / NOISE / FAIL per row) ---------
for json in "$LOG"/*/bench.json; do
    [ -f "$json" ] && $PY -P scripts/bench_targets.py "$json" >>"$LOG/targets.txt" 2>&1
done
[ -f "$LOG/targets.txt" ] && { echo "targets:"; cat "$LOG/targets.txt"; } | tee -a "$LOG/summary.txt"

tar -czf "$OUT/gpu-check.tar.gz" -C "$OUT" gpu-check
cp "$LOG/summary.txt" "$LOG/device.txt" "$OUT/"
echo "wrote $OUT/gpu-check.tar.gz"
