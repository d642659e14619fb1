#!/usr/bin/env bash
# The embedded demo (`make demo`): build the tiny Llama-3-architecture model and tokenizer offline,
# finetune it with ALLoRA under ZeRO-3 on 2 CPU processes with the deepspeed launcher, evaluate,
# and export a merged Hugging Face model and a PEFT adapter.
#   bash launch/demo.sh [OUT_DIR]        (default runs/demo)
set -euo pipefail
OUT=${1:-runs/demo}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [[ ! -f "$OUT/tiny-llama3/config.json" ]]; then
  echo "+ python -m allora_ds.tiny $OUT/tiny-llama3"
  python -m allora_ds.tiny "$OUT/tiny-llama3"
fi
rm -rf "$OUT/run"   # the demo always starts fresh; real runs resume instead
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cmd=(deepspeed --num_gpus "$NPROC" --master_port "$PORT" --module allora_ds.train configs/demo.yaml
     "model.path=$OUT/tiny-llama3" "train.output_dir=$OUT/run")
echo "+ ${cmd[*]}"
"${cmd[@]}"
python - "$OUT/run" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
train = [r for r in rows if r["kind"] == "train"]
evals = [r for r in rows if r["kind"] == "eval"]
print(f"\ntrain loss {train[0]['loss']:.3f} (step {train[0]['step']}) -> {train[-1]['loss']:.3f} (step {train[-1]['step']}); "
      f"eval loss {evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f}")
PY
cat <<MSG
Outputs:
  metrics        $OUT/run/metrics.jsonl   (TensorBoard: $OUT/run/tensorboard)
  checkpoints    $OUT/run/checkpoints/
  merged model   $OUT/run/export/merged   (AutoModelForCausalLM.from_pretrained)
  PEFT adapter   $OUT/run/export/adapter  (PeftModel.from_pretrained(base, ...))
MSG
