#!/usr/bin/env bash
# `make gpu-check`: validate allora_ds on one NVIDIA GPU in a few minutes, from a fresh clone.
#
#   bash launch/gpu_check.sh                 # on the GPU machine: install, GPU tests, 8B benchmark, one JSON
#   bash launch/gpu_check.sh wheels [DIR]    # on a machine with internet, for a GPU box without it
#
# run (default):
#   1. install: from the wheels in $GPU_WHEELS (default .gpu-wheels) into a private --target
#      directory, offline, when that folder holds any (the box has torch/transformers/peft but
#      no internet); otherwise `pip install -e .[dev]` into the active Python (its CUDA torch stays);
#   2. the GPU-marked tests (tests/gpu, CUDA variants of the adapter-gradient tests): a 1-GPU ZeRO-3
#      bf16 run of the tiny model under the deepspeed launcher (sdpa, and flash_attention_2 when
#      flash-attn is installed), packing per attention backend, the export round trip, ZeRO-2 bf16
#      (the 8B default) with a skipped step, the host syncs per step on ZeRO-3 and ZeRO-2;
#   3. bench/gpu.py on the Llama-3-8B shape: allora vs lora, seq 2048, and 2048-token rows packing
#      256-token examples; HF Trainer + PEFT on the same shape, rows and DeepSpeed JSON;
#   4. bench/gpu_long.py: the longest sequence the GPU trains for the Llama-3-8B shape with
#      checkpointing, tiled MLP and activation offload (one step per length from 16k, doubling,
#      within $LONG_BUDGET_S seconds, default 240), its tokens/s and peak memory beside allora-plan's;
#   5. writes $GPU_CHECK_OUT/gpu_check.json (default bench/results/): machine, each test's outcome,
#      step time, tokens/s, MFU and peak memory per method and workload, the long-sequence result.
# Environment: PYTHON (default python3), GPU_WHEELS, GPU_CHECK_OUT (or OUT), STEPS (timed steps, 5),
# LONG_BUDGET_S, QUICK=1 (the trainer tests only and 2 timed steps, no long-sequence stage: under 3 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
say() { echo "[gpu-check $(date +%T)] $*"; }

if [[ "${1:-run}" == wheels ]]; then
  # What the GPU image lacks (its python is 3.12 with torch, transformers, peft, xxhash, fsspec,
  # huggingface-hub): deepspeed (a pure wheel: ops are JIT-built, and our configs need none),
  # datasets and their own dependencies (pyarrow >= 24 is assumed there: its wheel alone is 53 MB).
  DIR=${2:-$WHEELS}
  mkdir -p "$DIR"
  dl=(download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR")
  "$PY" -m pip "${dl[@]}" datasets==5.2.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
      typing-extensions==4.16.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0
  DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DIR"
  say "wheels in $DIR ($(du -sh "$DIR" | cut -f1)); carry it to the GPU box and run: make gpu-check"
  exit 0
fi

OUT_DIR=${GPU_CHECK_OUT:-${OUT:-bench/results}}
mkdir -p "$OUT_DIR"
T0=$(date +%s)
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS (offline)"
  SITE=${TMPDIR:-/tmp}/allora-gpu-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  say "installing the project and its dependencies into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install -q -e ".[dev]"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ATTN=sdpa
if "$PY" -c 'import flash_attn' 2>/dev/null; then ATTN=flash_attention_2; fi

# The JSON is rewritten after every stage, so a run cut short (a timeout on a lent GPU) still
# returns what ran: tests_rc/bench_rc are null for a stage that has not finished.
report() {
  "$PY" - "$OUT_DIR" "$1" "$2" "${3:-null}" "$(( $(date +%s) - T0 ))" <<'PY'
import json, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, bench_rc, long_rc, wall = Path(sys.argv[1]), *map(json.loads, sys.argv[2:5]), int(sys.argv[5])
tests = []
if (out / "gpu_tests.xml").is_file():
    for case in ET.parse(out / "gpu_tests.xml").getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
bench = json.loads((out / "gpu_bench.json").read_text()) if (out / "gpu_bench.json").is_file() else None
long = json.loads((out / "gpu_long.json").read_text()) if (out / "gpu_long.json").is_file() else None
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
report = {"gpu": smi, "tests_rc": tests_rc, "bench_rc": bench_rc, "long_rc": long_rc, "wall_s": wall, "tests": tests,
          "long": None if long is None else {k: long[k] for k in (
              "longest_seq_len", "stopped", "mlp_tiles", "offload_saves_gb", "offload_saves_gb_planned")} | {
              "results": [{k: r[k] for k in ("seq_len", "step_s", "tokens_per_s", "mfu", "peak_gb", "offloaded_gb")}
                          | {"planned_gb": r["planned"]["allocator_gb"]} for r in long["results"]]},
          "bench": None if bench is None else {
              "machine": bench["machine"], "attn": bench["attn"], "allora_time_over_lora": bench["allora_time_over_lora"],
              "tokens_per_s_over_hf": bench.get("tokens_per_s_over_hf"), "peak_mem_over_hf": bench.get("peak_mem_over_hf"),
              "results": [{k: r[k] for k in ("method", "workload", "step_s", "tokens_per_s", "mfu", "hfu_with_recompute",
                                             "peak_mem_gb", "build_s")} for r in bench["results"]]}}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
bad = [t["test"] for t in tests if t["outcome"] in ("failure", "error")]
print(f"gpu-check: {len(tests)} tests, {len(bad)} failed{': ' + ', '.join(bad) if bad else ''}; "
      f"bench {'not run yet' if bench_rc is None else 'ok' if bench_rc == 0 else 'FAILED'}; "
      f"long sequence {'not run' if long_rc is None else 'FAILED' if long_rc else str(long['longest_seq_len']) + ' tokens'}; "
      f"{wall} s; wrote {out / 'gpu_check.json'}")
PY
}
QUICK=${QUICK:-0}  # QUICK=1 (make gpu-check QUICK=1): the trainer tests and 2 timed steps, under 3 minutes
rm -f "$OUT_DIR/gpu_tests.xml" "$OUT_DIR/gpu_bench.json" "$OUT_DIR/gpu_long.json"
say "GPU tests"
tests_rc=0
sel=(tests/gpu tests/unit/test_adapter_gradients.py)
[[ $QUICK == 1 ]] && sel=(tests/gpu -k "zero2 or host_syncs or zero3_bf16_run")
"$PY" -m pytest -q -m gpu "${sel[@]}" -p no:cacheprovider --junitxml "$OUT_DIR/gpu_tests.xml" || tests_rc=$?
report "$tests_rc" null
say "bench/gpu.py (Llama-3-8B shape, $ATTN)"
bench_rc=0
steps=${STEPS:-5}; [[ $QUICK == 1 ]] && steps=2
"$PY" bench/gpu.py --attn "$ATTN" --warmup 2 --steps "$steps" --out "$OUT_DIR/gpu_bench.json" || bench_rc=$?
report "$tests_rc" "$bench_rc"
long_rc=0
if [[ $QUICK != 1 ]]; then
  say "bench/gpu_long.py (longest sequence, Llama-3-8B shape, $ATTN)"
  "$PY" bench/gpu_long.py --attn "$ATTN" --budget-s "${LONG_BUDGET_S:-240}" --out "$OUT_DIR/gpu_long.json" || long_rc=$?
  report "$tests_rc" "$bench_rc" "$long_rc"
fi
exit $(( tests_rc || bench_rc || long_rc ))
