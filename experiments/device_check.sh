#!/usr/bin/env bash
# One command for the GPU machine (one H200): install the carried wheels, run the GPU-only tests, then the training
# step benchmarks, ours and the official step side by side, and write experiments/results/bench_train_gpu.{md,json}.
#
#   bash experiments/device_check.sh            # on the GPU machine; about 6-8 minutes, compilation included
#   bash experiments/device_check.sh --smoke    # on a CPU: every command once with tiny shapes (nothing written
#                                               # under experiments/results)
#
# Wheels: grain, tensorflow-datasets and ml_collections are not on the GPU image. `bash experiments/fetch_wheels.sh`
# (here, where pip reaches PyPI) fills .whl/; carry it with the call (`carry: [".whl"]`) and this script installs it
# into /tmp/site. WHEELS=dir picks another folder. Every step has its own timeout and the whole script stops
# starting new steps after BUDGET_S seconds (default 450), so it ends inside 8 minutes and can be rerun once
# within a 15-minute lease. Logs and per-run json go to $OUT (the device tool's folder) or /tmp/device_check.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
BUDGET_S=${BUDGET_S:-$([ $SMOKE = 1 ] && echo 1800 || echo 450)}
LOG_DIR=${OUT:-/tmp/device_check}
RUNS="$LOG_DIR/runs"
rm -rf "$RUNS"; mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1
START=$SECONDS
left() { echo $(( BUDGET_S - (SECONDS - START) )); }
step() {  # step NAME TIMEOUT_S command...: run it unless the budget is spent, log it, never stop the script
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -le 20 ]; then echo "SKIPPED $name (budget of ${BUDGET_S}s spent)"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "=== $name (timeout ${limit}s, $(( SECONDS - START ))s elapsed)"
  timeout "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && echo "FAILED $name (exit $rc)"
  return 0
}

# ---- environment ------------------------------------------------------------------------------------------------
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax, grain, ml_collections; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__)" \
  || { echo "missing packages: carry the wheels (experiments/fetch_wheels.sh)"; exit 1; }

# ---- GPU-only tests: cuDNN attention against XLA (bf16), the bf16 step's loss against the fp32 step's ----------
if [ $SMOKE = 1 ]; then
  step gpu_tests 300 env DINO_JAX_GPU_TESTS_ON_CPU=1 $PY -m pytest -q -p no:cacheprovider tests/gpu_checks.py
else
  step gpu_tests 75 $PY -m pytest -q -p no:cacheprovider tests/gpu_checks.py
fi

# ---- training-step benchmarks: ours and the official step (fp16 autocast, as its --use_fp16) --------------------
if [ $SMOKE = 1 ]; then
  COMMON="--smoke --steps=1 --warmup=1"; LIMIT=300
else
  COMMON="--peak_tflops=989 --torch_autocast --gpu_flags --steps=8 --warmup=2"; LIMIT=90
fi
bench() { local name=$1; shift; step "$name" $LIMIT $PY experiments/bench_train.py "$@" $COMMON --name="$name" --out="$RUNS"; }
bench 1_dino_vit_s16_b64 --arch=vit_small --batch=64
bench 2_dino_vit_s16_b256 --arch=vit_small --batch=256
bench 3_dino_vit_b16_b128 --arch=vit_base --batch=128
bench 4_swav_rn50_b256 --method=swav --arch=resnet50 --batch=256 --local_number=6
if [ $SMOKE = 1 ]; then
  $PY experiments/bench_train.py --collect="$RUNS" --out="$LOG_DIR"
else
  $PY experiments/bench_train.py --collect="$RUNS" --out=experiments/results
  cp experiments/results/bench_train_gpu.* "$LOG_DIR"/ 2>/dev/null    # only $OUT comes back from the device
fi

# ---- input pipeline (another helper's script, when present) ------------------------------------------------------
if [ -f experiments/bench_input.py ]; then
  if [ $SMOKE = 1 ]; then
    step input 200 $PY experiments/bench_input.py --config=configs/dino_vit_small16.py --batch=8 --images=16 --steps=2 \
      --out=/tmp/bench_input
  else
    step input 60 $PY experiments/bench_input.py --config=configs/dino_vit_small16.py --batch=256 --images=2048 \
      --steps=40 --out=/tmp/bench_input
  fi
fi

# ---- memory of the compiled step (GPU: memory_analysis) --------------------------------------------------------
if [ $SMOKE = 1 ]; then
  step memory 200 $PY experiments/bench_memory.py --smoke --remat=block --compile
else
  step memory 60 $PY experiments/bench_memory.py --remat=block --compile
  cp experiments/results/bench_memory_gpu.* "$LOG_DIR"/ 2>/dev/null   # only $OUT comes back from the device
fi

# ---- the step time around an asynchronous checkpoint save (ViT-S/16 DINO state on the GPU) ----------------------
if [ $SMOKE = 1 ]; then
  step faults 200 $PY experiments/bench_faults.py --steps=12 --save_every=4 --out="$LOG_DIR"
else
  step faults 90 $PY experiments/bench_faults.py --config=configs/dino_vit_small16.py --batch=64 --steps=40 \
    --save_every=8 --out=experiments/results
  cp experiments/results/bench_faults_gpu.* "$LOG_DIR"/ 2>/dev/null   # only $OUT comes back from the device
fi

echo "device_check done in $(( SECONDS - START ))s; logs: $LOG_DIR$([ $SMOKE = 1 ] || echo "; results: experiments/results/bench_{train,memory,faults}_gpu.{md,json}")"
