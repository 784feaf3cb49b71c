#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one run, sized for one 10-minute call on an H100/H200:
#   here, once:   bash scripts/device-wheels.sh      # .whl/: what the GPU machine's image lacks
#   on the GPU:   bash benchmarks/gpu.sh             # (device tool: carry [".whl"], timeout_s 600)
#   on the GPU:   bash benchmarks/gpu.sh sdxl        # the SDXL architecture at 1024 px, a call of its own
# Each step has its own time limit, so one that runs long still leaves the others' figures. Reports
# (JSON) go to $OUT when set (the device tool brings that folder back), else benchmarks/results/gpu/.
# QUICK=1 runs the same steps on the tiny model on a CPU, to check this script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if [ -d .whl ] && [ "${QUICK:-}" != 1 ]; then  # (QUICK: this machine's own packages)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
$PY -c "import diffusers, datasets, pydantic, accelerate, torch; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)" || {
  echo "missing packages: run scripts/device-wheels.sh here and carry .whl"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

SD=sd15 XL=sdxl FAST=(--preset fast) RES=() SDXL_RES=() FLOPS=sd15
if [ "${QUICK:-}" = 1 ]; then  # the plumbing on a CPU: tiny model, fp32, a few steps
  SD=tiny XL=tiny FAST=(--set train.channels_last=true) RES=(--precision no) SDXL_RES=(--resolution 64) FLOPS=tiny-sd
fi
step() {  # step NAME SECONDS ARGS...: one train_speed report, NAME.json, its table on stdout
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s)"
  # One work folder per architecture: the random model and the data are made once.
  timeout "$limit" $PY benchmarks/train_speed.py --workdir "/tmp/bench-${name%%-*}" --rows 32 \
    --json "$OUT/$name.json" "$@" \
    >"/tmp/bench-$name.log" 2>&1
  local rc=$?
  sed -n '/^[a-z0-9-]* @ /,$p' "/tmp/bench-$name.log"
  [ $rc = 0 ] || { echo "($name: exit $rc)"; tail -n 15 "/tmp/bench-$name.log"; }
}

case "${1:-sd15}" in
  sd15)
    # Issue 8's targets, in order of what they cost: speed over the reference at the reference's own
    # flags (fp16, batch 4); throughput with the fast preset (bf16); peak memory with the low-VRAM one.
    step sd15-fp16 200 --arch "$SD" --batch-size 4 --precision fp16 "${RES[@]}" --rounds 2 --steps 15
    step sd15-fast 150 --arch "$SD" --batch-size 8 "${FAST[@]}" --modes reference,ours --rounds 1 --steps 15
    step sd15-low-vram 120 --arch "$SD" --preset low-vram --batch-size 1 --modes ours --rounds 1 --steps 2 \
      ${QUICK:+--set train.optimizer=adamw --set train.mixed_precision=no}
    # The same step traced on fake tensors (benchmarks/memory.py), beside the measured peak above.
    timeout 120 $PY benchmarks/memory.py --arch "$SD" --preset low-vram --modes reference,ours \
      --json "$OUT/memory-sd15-low-vram.json" | sed -n '/traced on fake/,$p'
    $PY benchmarks/flops.py --arch "$FLOPS" >"$OUT/flops.json"
    # Last, so that running out of time loses only it: the low-VRAM step with the UNet stored in fp8,
    # with a LoRA of the ControlNet, and with an EMA kept in host memory (traced: 4.72, 2.97, 5.43 GiB).
    step sd15-low-vram-options 150 --arch "$SD" --preset low-vram --batch-size 1 --modes ours --rounds 1 \
      --steps 2 --variant fp8=train.fp8_base=true --variant "lora=train.lora={rank: 64}" \
      --variant "ema=train.ema_decay=0.9999;train.ema_offload=true" \
      ${QUICK:+--set train.optimizer=adamw --set train.mixed_precision=no}
    ;;
  sdxl)
    step sdxl-fast 540 --arch "$XL" "${SDXL_RES[@]}" --batch-size 2 "${FAST[@]}" --modes reference,ours \
      --rounds 1 --steps 10
    ;;
  *) echo "usage: benchmarks/gpu.sh [sd15|sdxl]"; exit 2 ;;
esac
