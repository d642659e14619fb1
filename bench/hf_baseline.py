"""The Hugging Face baseline of bench/throughput.py: transformers.Trainer + PEFT LoRA + DeepSpeed.

    deepspeed --num_gpus 2 bench/hf_baseline.py --model DIR --data FILE.jsonl --deepspeed DS.json \
        --out timing.json [--micro 2 --gas 2 --steps 12 --timed-from 4 --seq-len 256 --rank 16 ...]

Started by bench/throughput.py with the same model, data, DeepSpeed JSON and hyper-parameters as
the allora_ds run it is compared with. Rank 0 writes ``--out``: the wall-clock time between the
ends of optimizer steps ``--timed-from`` and ``--steps`` (each taken after a barrier, as the
allora_ds trainer's metrics all-reduce is one) and the tokens of the steps in between; and at
those two moments appends a line to ``--marks``, for the caller to read the CPU time.

``--format alpaca``: alpaca records rendered as allora_ds renders them (the Stanford prompt, loss on
the response and EOS), batched by ``--collator flat`` (transformers' ``DataCollatorWithFlattening``:
a micro-batch becomes one row, positions restart per example, no padding) or ``pad`` (right-padded
to the longest, attention mask); examples and tokens (before padding) of the window are counted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="jsonl with a 'text' field (or alpaca fields with --format alpaca)")
    p.add_argument("--format", choices=("text", "alpaca"), default="text")
    p.add_argument("--collator", choices=("flat", "pad"), default="pad", help="alpaca: flattening or padding")
    p.add_argument("--deepspeed", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--marks", default=None, help="rank 0 appends a line here at both ends of the timing window")
    p.add_argument("--output-dir", default=None, help="Trainer output_dir (nothing is saved there)")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--timed-from", type=int, default=4, help="the timing window starts at the end of this step")
    p.add_argument("--log-steps", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def let_accelerate_run_deepspeed_on_cpu() -> None:
    """accelerate only runs DeepSpeed on an accelerator: on a CPU-only machine its backend detection
    finds none (one process, no DeepSpeed), and its ``cpu=True`` mode turns DeepSpeed off. Under
    ``DS_ACCELERATOR=cpu`` answer as for a multi-process CPU run (gloo) instead; accelerate then
    joins DeepSpeed's process group and switches to DeepSpeed as on GPUs. Nothing else changes:
    the Trainer loop, accelerate's DeepSpeed wrapper and the DeepSpeed engine run as they are.
    """
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if os.environ.get("DS_ACCELERATOR") == "cpu" and not torch.cuda.is_available():
            return "gloo", DistributedType.MULTI_CPU
        return original(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = prepare_backend


def main() -> None:
    a = parse_args()
    let_accelerate_run_deepspeed_on_cpu()
    import datasets
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening
    from transformers.data.data_collator import default_data_collator

    from allora_ds.data import ALPACA_PROMPT
    from allora_ds.flops import causal_pairs

    # Created first: its HfTrainerDeepSpeedConfig makes from_pretrained build the model under
    # zero.Init (partitioned on creation), as the allora_ds trainer does.
    args = TrainingArguments(
        output_dir=a.output_dir or str(Path(a.out).parent / "hf_trainer"), per_device_train_batch_size=a.micro,
        gradient_accumulation_steps=a.gas, max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        logging_steps=a.log_steps, save_strategy="no", eval_strategy="no", report_to=[], deepspeed=a.deepspeed,
        seed=a.seed, dataloader_drop_last=True, disable_tqdm=True,
    )
    tok = AutoTokenizer.from_pretrained(a.model)

    def encode(row):
        if a.format == "alpaca":
            # As allora_ds's `alpaca` format: the prompt (with BOS) masked, the response + EOS labelled.
            prompt = tok(ALPACA_PROMPT.format(instruction=row["instruction"])).input_ids
            response = tok(row["output"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids, labels = (prompt + response)[: a.seq_len], ([-100] * len(prompt) + response)[: a.seq_len]
        else:
            # As allora_ds's `text` format: the tokenizer's ids (with BOS) + EOS, truncated; loss on every token.
            ids = (tok(row["text"]).input_ids + [tok.eos_token_id])[: a.seq_len]
            labels = list(ids)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    with args.main_process_first():
        ds = datasets.load_dataset("json", data_files=a.data, split="train")
        ds = ds.map(encode, remove_columns=ds.column_names)
    if a.format == "text":
        assert all(len(x) == a.seq_len for x in ds["input_ids"]), "benchmark rows must all be seq_len tokens"
        collator = default_data_collator
    elif a.collator == "flat":
        collator = DataCollatorWithFlattening()
    else:
        collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    # (examples, tokens before padding, tokens after, causal query-key pairs) of every micro-batch, in order
    counts = []

    def counting_collator(features):
        batch = collator(features)
        lengths = [len(f["input_ids"]) for f in features]
        counts.append((len(features), sum(lengths), batch["input_ids"].numel(), causal_pairs(lengths)))
        return batch

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, bias="none",
                                             target_modules=a.targets.split(","), task_type="CAUSAL_LM"))

    marks: dict[int, float] = {}

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (a.timed_from, a.steps):
                dist.barrier()
                marks[state.global_step] = time.perf_counter()
                if a.marks and dist.get_rank() == 0:
                    with open(a.marks, "a") as f:
                        f.write(f"{state.global_step}\n")

    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counting_collator,
                      callbacks=[StepTimer()])
    trainer.train()
    world = dist.get_world_size()
    # Micro-batch j belongs to optimizer step j // gas + 1 (the loader may have collated one more).
    window = [c for j, c in enumerate(counts) if a.timed_from < j // a.gas + 1 <= a.steps]
    assert len(window) == (a.steps - a.timed_from) * a.gas, (len(counts), len(window))
    totals = torch.tensor([[sum(c[k] for c in window) for k in range(4)]], dtype=torch.float64)
    dist.all_reduce(totals)
    examples, tokens, padded, pairs = (int(x) for x in totals[0].tolist())
    if dist.get_rank() == 0:
        assert examples == (a.steps - a.timed_from) * a.micro * a.gas * world
        dt = marks[a.steps] - marks[a.timed_from]
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        Path(a.out).write_text(json.dumps({
            "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "world": world, "final_loss": losses[-1],
            "examples": examples, "padded_tokens": padded, "causal_pairs": pairs,
            "trainable": model.get_nb_trainable_parameters()[0],
            # every parameter, base and adapter, is a ZeRO-3 partitioned one (as in allora_ds)
            "zero3_partitioned": all(hasattr(p, "ds_id") for p in model.parameters()),
        }))

if __name__ == "__main__":
    from allora_ds.errors import cli  # each rank ends through errors._exit, never in gloo's teardown abort

    cli(main)()
