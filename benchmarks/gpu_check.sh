#!/usr/bin/env bash
# The GPU checks in one call, about 8-9 minutes on an H100/H200 (run from the repository root):
#   1. the CUDA tests (`pytest -m gpu`);
#   2. benchmarks/speed.py at paper size (R50-FPN, short side 800, bf16, frozen BatchNorm): the
#      fixed five images as in speed.md's table, then batches as the training sampler draws
#      them, grouped by orientation and not (--sampled-steps);
#   3. 120 iterations of the Soft Teacher training loop at the `default` preset's multi-scale
#      sizes, whose metrics.jsonl holds the step time and the wait for data (time/data_s): as
#      configured, with the CUDA allocator's expandable segments, and with 8 data workers.
# Everything goes under $OUT (default runs/gpu_check): one file per check, and summary.txt.
#
# A machine without pycocotools or pytest (and what they need) installs the wheels found in
# $WHEELS (default .whl; for a Python 3.12 machine, fetch them elsewhere with
#   pip download --no-deps --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 -d .whl pycocotools pytest pluggy iniconfig packaging pyyaml
# ). The package itself runs from src/ (no install).
#
# QUICK=1 DEVICE=cpu bash benchmarks/gpu_check.sh   tries the plumbing on a CPU in a few minutes
# (the `shapes-cpu` preset, fp32, a handful of steps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

if ! $PY -c "import pycocotools, pytest, yaml" 2>/dev/null; then
    $PY -m pip install -q --no-deps "$WHEELS"/*.whl > "$OUT/pip.txt" 2>&1
    note "installed wheels from $WHEELS: rc $?"
fi
$PY - > "$OUT/software.json" <<'EOF'
import json, platform, torch, torchvision
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "gpu": gpu}))
EOF
note "software: $(cat "$OUT/software.json")"
note "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

if [ "${QUICK:-0}" = 1 ]; then
    SPEED=(--preset shapes-cpu --steps 1 --warmup 1 --sampled-steps 1 --threads 2)
    LOOP=(--preset shapes-cpu --set solver.max_iter=4 --set train.log_period=2)
    TESTS=(tests/test_geometry.py)
else
    SPEED=(--preset default --amp bf16 --size 800 1333 --steps 12 --warmup 3 --sampled-steps 12
           --set model.norm=frozen_bn)
    LOOP=(--preset default --set solver.amp=bf16 --set model.norm=frozen_bn
          --set solver.max_iter=120 --set train.log_period=20)
    TESTS=(-m gpu tests)
fi

start=$SECONDS
timeout 240 $PY -m pytest -q -p no:cacheprovider "${TESTS[@]}" > "$OUT/tests.txt" 2>&1
note "tests: rc $? in $((SECONDS - start)) s: $(tail -n 1 "$OUT/tests.txt")"

start=$SECONDS
timeout 300 $PY benchmarks/speed.py --device "$DEVICE" "${SPEED[@]}" \
    > "$OUT/speed.jsonl" 2> "$OUT/speed.err"
note "speed: rc $? in $((SECONDS - start)) s"
$PY - "$OUT/speed.jsonl" <<'EOF' | tee -a "$summary"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "s_per_iter_mean" in r or "value" in r:
        print(" ", r["measure"], "grouped" if r.get("group_by_aspect") else "",
              r.get("s_per_iter_median", r.get("value")), r.get("peak_mib", ""))
EOF

R=$($PY -c "from softteacher.data import shapes; print(shapes.generate_shapes(shapes.default_root()).train_json)")
R=$(dirname "$(dirname "$R")")
# the loop as configured ("base"), with the CUDA allocator's expandable segments (every batch has
# new sizes: does allocating for them cost?), and with 8 data workers; LOOPS picks some of them
for variant in ${LOOPS:-base alloc workers}; do
    extra=() env=()
    case $variant in
        alloc) env=(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) ;;
        workers) extra=(--set data.num_workers=8) ;;
    esac
    loop=$(mktemp -d)  # its checkpoint stays out of $OUT
    start=$SECONDS
    env "${env[@]}" timeout 200 $PY -m softteacher train --no-progress --out "$loop" "${LOOP[@]}" \
        "${extra[@]}" --set train.device="$DEVICE" --set train.checkpoint_period=0 \
        --set train.vis_period=0 \
        --set data.train="$R/annotations/instances_train.json" --set data.train_images="$R/images/train" \
        --set data.unlabeled="$R/annotations/image_info_unlabeled.json" \
        --set data.unlabeled_images="$R/images/unlabeled" > "$OUT/loop_$variant.txt" 2>&1
    note "loop $variant: rc $? in $((SECONDS - start)) s"
    cp "$loop/metrics.jsonl" "$OUT/loop_${variant}_metrics.jsonl"
    rm -rf "$loop"
    $PY - "$OUT/loop_${variant}_metrics.jsonl" <<'EOF' | tee -a "$summary"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("kind") == "train":
        print(f"  iteration {r['iteration']}: s/it {r['time/step_s']:.3f}, data {r['time/data_s']:.3f}")
EOF
done
