"""Training throughput: allora_ds (ALLoRA and LoRA) vs transformers.Trainer + PEFT LoRA, both on DeepSpeed ZeRO-3.

    .venv/bin/python bench/throughput.py               # full run: 60M model, 5 reps (~20 min on 2 idle cores)
    .venv/bin/python bench/throughput.py --reps 8      # more repetitions
    .venv/bin/python bench/throughput.py --quick --out /tmp/throughput_quick.json --cache-dir /tmp/c   # CI smoke

What runs, per repetition, in an order rotated from one repetition to the next (so load from other
processes falls on every system alike):
  * ``allora``: ``deepspeed --num_gpus 2 --module allora_ds.train`` (the real CLI), method allora;
  * ``lora``:   the same with ``adapter.method=lora``;
  * ``hf``:     ``deepspeed --num_gpus 2 bench/hf_baseline.py``: transformers.Trainer (accelerate's
    DeepSpeed path) + PEFT ``LoraConfig``.
All three train the same random-weight Llama-3-architecture model (built once, cached under
bench/cache/) on the same rows of ``text`` data, every row exactly ``seq_len`` tokens (no padding),
with the same rank-16 adapters on the 7 projections (alpha 32, dropout 0), micro-batch, gradient
accumulation, AdamW, lr and cosine schedule, fp32, 2 CPU processes with one thread each, no eval,
no checkpoint inside the timing. Both trainers read one DeepSpeed JSON: ds_configs/zero3_cpu.json
with every "auto" resolved once, by the rule both trainers use (bucket sizes from the hidden size),
so neither fills its own.

Measurement, the same for all: tokens of optimizer steps ``timed_from+1 .. steps`` divided by the
wall-clock time from the end of step ``timed_from`` to the end of step ``steps`` on rank 0, both ends
after a collective (allora_ds: its metrics all-reduce, read back from metrics.jsonl with
``train.log_steps = timed_from``; HF: a callback with a barrier). Startup, data loading, model
build and the final save are outside the window; the first steps (allocator, DeepSpeed's first
gathers) are warmup.

Reported: median tokens/s per system and medians of per-repetition (paired) ratios. Goals from the
issue: allora_ds / HF >= 1.2; allora step time / lora step time <= 1.03. Writes JSON (default
bench/results/throughput.json) and prints a table last.

``--alpaca``: instruction data with Llama-3's real vocabulary instead (hidden 512, 8 layers,
vocabulary 128,256, so the LM head is most of the model), alpaca rows with a prompt of 60-250
tokens and a response of 20-300, each trainer in its best padding-free setting, examples/s:
  * ``allora``:     allora_ds (allora), ``data.packing`` (whole examples packed into rows of
    ``pack_len`` tokens, restarted positions, no padding), the chunked loss (allora_ds.loss);
  * ``allora_full_logits``: the same with ``train.chunked_loss=false`` (transformers' loss), to
    show what the loss path is worth;
  * ``hf_flat``:    Trainer + PEFT LoRA with ``DataCollatorWithFlattening`` (each micro-batch of
    ``hf_micro`` examples concatenated into one row, restarted positions, no padding);
  * ``hf_pad``:     Trainer + PEFT LoRA, the same micro-batches right-padded (plain padding).
One DeepSpeed JSON for all (ds_configs/zero3_cpu.json resolved once) except its three batch-size
fields, left "auto": a micro-batch is one packed row for allora_ds and ``hf_micro`` examples for
the Trainer, each filling them from its own arguments. Examples in the timing window are counted
exactly (allora_ds: from its data order, which is a pure function of seed and step; HF: micro x
ranks per step). Goal from the issue: allora_ds / HF flattening >= 1.3 in examples/s. Writes
bench/results/throughput_alpaca.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bench.common import (  # noqa: E402
    CACHE, REPO, RESULTS, child_env, deepspeed_cmd, machine, median, paired_ratio, run_job, table, write_json,
)

SYSTEMS = ("allora", "lora", "hf")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GOAL_OVER_HF = 1.2
GOAL_ALLORA_OVER_LORA = 1.03
DEFAULT_OUT = RESULTS / "throughput.json"
BREAKDOWN_OUT = RESULTS / "throughput_breakdown.json"


@dataclass(frozen=True)
class Setting:
    # model: Llama-3 architecture (GQA, SiLU MLP 3.5x, RMSNorm, rope 500k, untied embeddings)
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 32000  # Llama-2's size: Llama-3's 128k would make the LM head most of a 60M model
    # data and batch
    seq_len: int = 256
    rows: int = 256
    micro: int = 2
    gas: int = 2
    # run and timing
    steps: int = 8
    timed_from: int = 2
    reps: int = 5
    rank: int = 16
    alpha: float = 32.0
    lr: float = 1e-4
    world: int = 2
    # alpaca workload: allora_ds packs examples into rows of pack_len tokens (micro rows per
    # micro-batch); the Trainer takes hf_micro examples per micro-batch
    workload: str = "text"  # text, or alpaca-format instruction rows: alpaca, commonsense
    pack_len: int = 0
    hf_micro: int = 0
    prompt_tokens: tuple[int, int] = (60, 250)  # instruction rows: uniform ranges of the rendered prompt
    response_tokens: tuple[int, int] = (20, 300)  # and of the response (+ EOS)
    layout: str = "zero3_cpu"  # the shipped DeepSpeed JSON both trainers read (bf16 taken from the dtype)
    packing: str = "greedy"  # instruction rows: allora_ds's data.packing strategy

    @property
    def instruction(self) -> bool:
        return self.workload != "text"

    def model_key(self) -> str:
        keys = ("hidden", "layers", "heads", "kv_heads", "vocab", "seq_len", "rows", "workload")
        spec = {k: getattr(self, k) for k in keys}
        if self.instruction:
            spec.update(prompt=list(self.prompt_tokens), response=list(self.response_tokens))
        return hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:10]


FULL = Setting()
QUICK = Setting(hidden=64, layers=2, heads=4, kv_heads=2, vocab=512, seq_len=64, rows=32, micro=2, gas=1,
                steps=4, timed_from=2, reps=1)
# seq_len: the longest example (250 + 300 tokens); an allora_ds row packs about as many tokens as
# the Trainer's micro-batch of 4 examples (4 x ~315 on average)
ALPACA = Setting(vocab=128256, seq_len=550, rows=512, micro=1, gas=1, steps=8, timed_from=2, reps=3,
                 workload="alpaca", pack_len=1280, hf_micro=4)
ALPACA_QUICK = Setting(hidden=64, layers=2, heads=4, kv_heads=2, vocab=2048, seq_len=550, rows=48, micro=1, gas=1,
                       steps=4, timed_from=2, reps=1, workload="alpaca", pack_len=1280, hf_micro=4)
ALPACA_SYSTEMS = ("allora", "allora_full_logits", "hf_flat", "hf_pad")
GOAL_ALPACA_OVER_HF = 1.3
ALPACA_OUT = RESULTS / "throughput_alpaca.json"


def build_assets(s: Setting, cache: Path) -> tuple[Path, Path]:
    """Random-weight model + tokenizer (HF format) and the data file, built once per setting."""
    d = cache / f"throughput-{s.model_key()}"
    model_dir, data = d / "model", d / "train.jsonl"
    if (model_dir / "config.json").is_file() and data.is_file():
        return model_dir, data
    import torch
    from transformers import LlamaForCausalLM

    from allora_ds.tiny import ASSETS, build_tokenizer, tiny_llama_config

    tmp = d.with_name(d.name + ".tmp")
    tok = build_tokenizer(tmp / "model")
    config = tiny_llama_config(s.vocab, hidden=s.hidden, layers=s.layers, heads=s.heads, kv_heads=s.kv_heads,
                               max_positions=max(1024, s.seq_len))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp / "model")
    lines = (ASSETS / "corpus.txt").read_text(encoding="utf-8").splitlines()
    rows = alpaca_rows(s, tok, lines) if s.instruction else text_rows(s, tok, lines)
    (tmp / "train.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n", encoding="utf-8")
    n = sum(p.numel() for p in model.parameters())
    info = {"parameters": n, "setting": asdict(s)}
    if s.instruction:
        info["data"] = alpaca_stats(rows, tok)
    (tmp / "info.json").write_text(json.dumps(info))
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)
    print(f"built {n / 1e6:.1f}M-parameter model and {s.rows} rows of {s.seq_len} tokens in {d}", flush=True)
    return model_dir, data


def text_rows(s: Setting, tok, lines: list[str]) -> list[dict]:
    """Each row: consecutive corpus lines until it tokenizes to more than seq_len tokens, so that
    truncation makes every row exactly seq_len long on both sides (no padding anywhere)."""
    rows, i = [], 0
    for _ in range(s.rows):
        text = []
        while len(tok(" ".join(text)).input_ids) <= s.seq_len:
            text.append(lines[i % len(lines)])
            i += 1
        rows.append({"text": " ".join(text)})
    return rows


def alpaca_rows(s: Setting, tok, lines: list[str]) -> list[dict]:
    """Alpaca records whose rendered prompt (template + instruction) has ``s.prompt_tokens`` tokens and
    whose response (+ EOS) ``s.response_tokens``, uniformly drawn (seeded); text from the corpus, word
    by word."""
    import random

    from allora_ds.data import ALPACA_PROMPT

    rng = random.Random(0)
    words = " ".join(lines).split()
    pos = 0

    def grow(n_tokens: int, count) -> str:
        nonlocal pos
        text: list[str] = []
        while count(" ".join(text)) < n_tokens:
            text.append(words[pos % len(words)])
            pos += 1
        return " ".join(text)

    rows = []
    for _ in range(s.rows):
        p, r = rng.randint(*s.prompt_tokens), rng.randint(*s.response_tokens)
        instruction = grow(p, lambda t: len(tok(ALPACA_PROMPT.format(instruction=t)).input_ids))
        output = grow(r - 1, lambda t: len(tok(t, add_special_tokens=False).input_ids))  # + EOS
        rows.append({"instruction": instruction, "input": "", "output": output})
    return rows


def alpaca_stats(rows: list[dict], tok) -> dict:
    """Token counts as both trainers see them (prompt with BOS; response with EOS)."""
    from allora_ds.data import ALPACA_PROMPT

    p = [len(tok(ALPACA_PROMPT.format(instruction=r["instruction"])).input_ids) for r in rows]
    r = [len(tok(x["output"], add_special_tokens=False).input_ids) + 1 for x in rows]
    return {"examples": len(rows), "prompt_tokens_min": min(p), "prompt_tokens_max": max(p),
            "prompt_tokens_mean": sum(p) / len(p), "response_tokens_min": min(r), "response_tokens_max": max(r),
            "response_tokens_mean": sum(r) / len(r), "labelled_fraction": sum(r) / (sum(p) + sum(r))}


def bench_ds_config(s: Setting, model_dir: Path, data: Path, out: Path) -> dict:
    """ds_configs/<s.layout>.json with every "auto" resolved by allora_ds's filler, which uses the same
    rules as transformers' (batch sizes and optimizer from the arguments, bucket sizes from the hidden
    size), bf16 taken from the model's dtype (fp32 here); written as the single explicit JSON both
    trainers read."""
    from allora_ds.config import load_config
    from allora_ds.ds_config import fill_ds_config, read_ds_config

    src = REPO / "ds_configs" / f"{s.layout}.json"
    cfg = load_config(None, base=allora_config(s, "allora", model_dir, data, out.parent, src))
    raw = read_ds_config(src)
    raw["bf16"] = {**raw.get("bf16", {}), "enabled": "auto"}
    ds = fill_ds_config(raw, cfg, s.world, s.hidden, src)
    if s.instruction:  # a micro-batch is a packed row for one trainer, examples for the other
        ds.update({k: "auto" for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                       "train_batch_size")})
    out.write_text(json.dumps(ds, indent=2))
    return ds


def allora_config(s: Setting, method: str, model_dir: Path, data: Path, run_dir: Path, ds_path: Path,
                  chunked_loss: bool = True) -> dict:
    data_section = {"train": str(data), "format": "text", "max_seq_len": s.seq_len, "packing": False}
    if s.instruction:
        data_section = {"train": str(data), "format": "alpaca", "max_seq_len": s.pack_len, "packing": s.packing}
    return {
        "model": {"path": str(model_dir), "dtype": "float32", "gradient_checkpointing": False},
        "adapter": {"method": method, "rank": s.rank, "eta": 2.0, "alpha": s.alpha, "dropout": 0.0,
                    "target_modules": list(TARGETS)},
        "data": data_section,
        "train": {"output_dir": str(run_dir), "deepspeed": str(ds_path), "micro_batch_size": s.micro,
                  "gradient_accumulation_steps": s.gas, "lr": s.lr, "max_steps": s.steps, "warmup_steps": 0,
                  "scheduler": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0, "log_steps": s.timed_from,
                  "save_steps": 0, "resume": "never", "seed": 42, "chunked_loss": chunked_loss},
    }


def run_allora(s: Setting, method: str, model_dir: Path, data: Path, ds_path: Path, work: Path, env: dict,
               chunked_loss: bool = True, window: dict | None = None) -> dict:
    import yaml

    run_dir = work / "run"
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(allora_config(s, method, model_dir, data, run_dir, ds_path, chunked_loss)))
    metrics = run_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    cpu = run_job(deepspeed_cmd(s.world, "--module", "allora_ds.train", cfg_path), work / "log.txt", env,
                  timeout=3600, marks=metrics)
    wall = time.perf_counter() - t0
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    # log_steps = timed_from and (steps - timed_from) a multiple of it: the records after the first
    # tile the window; each record covers the steps since the previous one.
    assert [r["step"] for r in recs] == list(range(s.timed_from, s.steps + 1, s.timed_from)), recs
    seconds = sum(r["train_seconds"] for r in recs[1:])
    tokens = round(sum(r["tokens_per_s"] * r["train_seconds"] for r in recs[1:]))
    out = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_s": cpu[-1] - cpu[0],
           "wall_s": wall, "final_loss": recs[-1]["loss"]}
    if window is not None:  # alpaca: the examples of the window, from the data order
        assert tokens == window["tokens"], f"metrics count {tokens} tokens, the data order {window['tokens']}"
        out.update(examples=window["examples"], examples_per_s=window["examples"] / seconds,
                   causal_pairs=window["causal_pairs"])
    return out


def allora_window(s: Setting, model_dir: Path, data: Path, ds_path: Path, work: Path) -> dict:
    """Examples and tokens of optimizer steps timed_from+1 .. steps in an allora_ds run: its data order
    is a pure function of (seed, step), so it is recomputed here with the trainer's own functions."""
    from allora_ds.config import load_config
    from allora_ds.data import epoch_order, example_lengths, rounds_per_epoch, rank_micro_batch
    from allora_ds.flops import causal_pairs
    from allora_ds.modeling import load_tokenizer
    from allora_ds.train import prepare_data

    cfg = load_config(None, base=allora_config(s, "allora", model_dir, data, work / "window", ds_path))
    rows = prepare_data(cfg, load_tokenizer(cfg.model), rank=1)[0]  # rank != 0: no report printed
    t = cfg.train
    rounds = rounds_per_epoch(len(rows), t.micro_batch_size, s.world)
    rounds -= rounds % t.gradient_accumulation_steps
    examples = tokens = pairs = 0
    for step in range(s.timed_from, s.steps):  # 0-based: the steps after the first timed_from
        epoch, first = divmod(step * t.gradient_accumulation_steps, rounds)
        order = epoch_order(len(rows), t.seed, epoch)
        for k in range(t.gradient_accumulation_steps):
            for rank in range(s.world):
                for i in rank_micro_batch(order, first + k, t.micro_batch_size, s.world, rank):
                    examples += len(example_lengths(rows[i]))
                    tokens += len(rows[i]["input_ids"])
                    pairs += causal_pairs(example_lengths(rows[i]))
    return {"examples": examples, "tokens": tokens, "causal_pairs": pairs, "packed_rows": len(rows)}


def run_hf(s: Setting, model_dir: Path, data: Path, ds_path: Path, work: Path, env: dict, collator: str = "") -> dict:
    out, marks = work / "timing.json", work / "marks.txt"
    alpaca = s.instruction
    cmd = deepspeed_cmd(
        s.world, REPO / "bench" / "hf_baseline.py", "--model", model_dir, "--data", data, "--deepspeed", ds_path,
        "--out", out, "--marks", marks, "--output-dir", work / "trainer", "--micro", s.hf_micro if alpaca else s.micro,
        "--gas", s.gas, "--steps", s.steps, "--timed-from", s.timed_from, "--log-steps", s.timed_from,
        "--seq-len", s.seq_len, "--lr", s.lr, "--rank", s.rank, "--alpha", s.alpha, "--targets", ",".join(TARGETS),
        *(["--format", "alpaca", "--collator", collator] if alpaca else []),
    )
    t0 = time.perf_counter()
    cpu = run_job(cmd, work / "log.txt", env, timeout=3600, marks=marks)
    wall = time.perf_counter() - t0
    r = json.loads(out.read_text())
    assert len(cpu) == 2
    if not alpaca:
        assert r["tokens"] == (s.steps - s.timed_from) * s.micro * s.gas * s.world * s.seq_len
    res = {"tokens": r["tokens"], "seconds": r["seconds"], "tokens_per_s": r["tokens_per_s"], "cpu_s": cpu[1] - cpu[0],
           "wall_s": wall, "final_loss": r["final_loss"], "zero3_partitioned": r["zero3_partitioned"]}
    if alpaca:
        res.update(examples=r["examples"], examples_per_s=r["examples"] / r["seconds"],
                   padded_tokens=r["padded_tokens"], causal_pairs=r["causal_pairs"])
    return res


def summarise(runs: list[dict]) -> dict:
    out = {}
    for metric in ("tokens_per_s", "cpu_tokens_per_s"):
        v = {k: [r[metric] for r in runs if r["system"] == k] for k in SYSTEMS}
        out[metric] = {
            "median": {k: median(x) for k, x in v.items()},
            "allora_over_hf": paired_ratio(v["allora"], v["hf"]),
            "lora_over_hf": paired_ratio(v["lora"], v["hf"]),
            # step time of allora over that of lora: the adapter method's own cost
            "allora_time_over_lora": paired_ratio(v["lora"], v["allora"]),
        }
    return out


ALPACA_RATIOS = {"allora_over_hf_flat": ("allora", "hf_flat"), "allora_over_hf_pad": ("allora", "hf_pad"),
                 "allora_full_logits_over_hf_flat": ("allora_full_logits", "hf_flat"),
                 "allora_over_allora_full_logits": ("allora", "allora_full_logits"),
                 "hf_flat_over_hf_pad": ("hf_flat", "hf_pad")}


def summarise_alpaca(runs: list[dict]) -> dict:
    """Medians and paired ratios of the systems that ran."""
    out = {}
    for metric in ("examples_per_s", "cpu_examples_per_s", "tokens_per_s"):
        v = {k: [r[metric] for r in runs if r["system"] == k] for k in ALPACA_SYSTEMS}
        out[metric] = {"median": {k: median(x) for k, x in v.items() if x},
                       **{name: paired_ratio(v[a], v[b]) for name, (a, b) in ALPACA_RATIOS.items() if v[a] and v[b]}}
    return out


def breakdown_worker(s: Setting, kind: str, model_dir: Path, data: Path, reps: int, out: Path) -> None:
    """One process, a world of one: plain autograd (no DeepSpeed) and the allora_ds trainer's step on
    engine ``kind`` (stage0 or zero3) on the same batches, alternating; CPU seconds per optimizer step."""
    import torch
    from transformers import AutoModelForCausalLM

    from allora_ds import train as T
    from allora_ds.adapters import AdapterSpec, inject_adapters
    from allora_ds.config import load_config

    s = replace(s, world=1)
    # Built before DeepSpeed's zero.Init swaps torch.nn.functional.linear for its own (ZeRO-3 only).
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    plain.config.use_cache = False
    inject_adapters(plain, AdapterSpec(method="allora", rank=s.rank), seed=42, verbose=False)
    plain.train()
    ds_path = out.parent / "ds_config.json"
    ds = bench_ds_config(s, model_dir, data, ds_path)
    if kind == "stage0":
        ds["zero_optimization"] = {"stage": 0}
        ds_path.write_text(json.dumps(ds))
    run = T.setup(load_config(None, base=allora_config(s, "allora", model_dir, data, out.parent / "run", ds_path)))

    def plain_step(step: int) -> None:
        for batch in T.micro_batches(run, step).batches:
            plain(**batch).loss.backward()
        plain.zero_grad(set_to_none=True)

    cpu: dict[str, list[float]] = {"plain": [], kind: []}
    for rep in range(reps + 1):  # the first round is warmup
        for name in ("plain", kind) if rep % 2 else (kind, "plain"):
            c0 = time.process_time()
            if name == "plain":
                plain_step(run.step)
            else:
                T.train_step(run)
                run.step += 1
            if rep:
                cpu[name].append(time.process_time() - c0)
    out.write_text(json.dumps(cpu))


def breakdown(s: Setting, quick: bool, model_dir: Path, data: Path, reps: int, out: Path) -> dict:
    """Where a step's time goes on one rank: compute alone, + DeepSpeed's engine, + ZeRO-3."""
    t0 = time.perf_counter()
    cpu = {}
    with tempfile.TemporaryDirectory(prefix="breakdown-") as tmp:
        for kind in ("stage0", "zero3"):
            work = Path(tmp) / kind
            work.mkdir()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--breakdown-worker", kind, "--reps", str(reps),
                   "--worker-out", str(work / "cpu.json"), *(["--quick"] if quick else [])]
            run_job(cmd, work / "log.txt", child_env(threads=1), timeout=3600)
            cpu[kind] = json.loads((work / "cpu.json").read_text())
    tokens = s.micro * s.gas * s.seq_len
    plain = [x for kind in cpu for x in cpu[kind]["plain"]]
    res = {"machine": machine(), "setting": asdict(s), "tokens_per_step": tokens, "cpu_s": cpu,
           "plain_cpu_s_per_step": median(plain),
           "stage0_over_plain": paired_ratio(cpu["stage0"]["stage0"], cpu["stage0"]["plain"]),
           "zero3_over_plain": paired_ratio(cpu["zero3"]["zero3"], cpu["zero3"]["plain"]),
           "wall_s": time.perf_counter() - t0}
    write_json(out, res)
    print(f"\n{res['machine']['cpu']}; one process, 1 thread, fp32, {tokens} tokens per optimizer step "
          f"(micro {s.micro} x accumulation {s.gas} x seq {s.seq_len}), {reps} alternating repetitions; wrote {out}")
    print(table(["what runs", "CPU s/step", "x plain"], [
        ["plain autograd (model + allora adapters, no DeepSpeed)", res["plain_cpu_s_per_step"], 1.0],
        ["allora_ds train_step, DeepSpeed stage 0", median(cpu["stage0"]["stage0"]), res["stage0_over_plain"]],
        ["allora_ds train_step, DeepSpeed ZeRO-3", median(cpu["zero3"]["zero3"]), res["zero3_over_plain"]],
    ], {1: ".3f", 2: ".3f"}))
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 steps, 1 repetition: a smoke test")
    ap.add_argument("--reps", type=int, default=None, help=f"repetitions (default {FULL.reps}; {QUICK.reps} with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    ap.add_argument("--timed-from", type=int, default=None, help="warmup steps; must divide steps - timed_from")
    ap.add_argument("--systems", default=None, help=f"subset to run, e.g. allora,hf (of {', '.join(SYSTEMS)}; "
                    f"with --alpaca of {', '.join(ALPACA_SYSTEMS)})")
    ap.add_argument("--alpaca", action="store_true", help="instead: alpaca rows, Llama-3 vocabulary, examples/s, "
                    "each trainer padding-free (see the module docstring)")
    ap.add_argument("--cache-dir", type=Path, default=CACHE)
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep run directories (logs, metrics) here")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON (default {DEFAULT_OUT.relative_to(REPO)}, "
                    f"{BREAKDOWN_OUT.relative_to(REPO)} with --breakdown, {ALPACA_OUT.relative_to(REPO)} with --alpaca)")
    ap.add_argument("--breakdown", action="store_true",
                    help="instead: CPU time of one rank's step, plain autograd vs DeepSpeed stage 0 vs ZeRO-3")
    ap.add_argument("--breakdown-worker", choices=("stage0", "zero3"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.breakdown_worker:
        model_dir, data = build_assets(s, args.cache_dir)
        breakdown_worker(s, args.breakdown_worker, model_dir, data, args.reps, args.worker_out)
        return {}
    if args.breakdown:
        model_dir, data = build_assets(s, args.cache_dir)
        return breakdown(s, args.quick, model_dir, data, args.reps or (1 if args.quick else 6),
                         args.out or BREAKDOWN_OUT)
    all_systems = ALPACA_SYSTEMS if args.alpaca else SYSTEMS
    if args.alpaca:
        s = ALPACA_QUICK if args.quick else ALPACA
    args.out = args.out or (ALPACA_OUT if args.alpaca else DEFAULT_OUT)
    s = replace(s, **{k: v for k, v in (("reps", args.reps), ("steps", args.steps), ("timed_from", args.timed_from))
                      if v is not None})
    if (s.steps - s.timed_from) % s.timed_from or s.steps <= s.timed_from:
        ap.error("steps - timed_from must be a positive multiple of timed_from")
    wanted = args.systems.split(",") if args.systems else all_systems
    systems = tuple(x for x in all_systems if x in wanted)

    t_start = time.perf_counter()
    info = {"machine": machine()}
    model_dir, data = build_assets(s, args.cache_dir)
    env = child_env(threads=1)
    runs = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        root = args.keep_runs or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ds_path = root / "ds_config.json"
        ds = bench_ds_config(s, model_dir, data, ds_path)
        window = allora_window(s, model_dir, data, ds_path, root) if args.alpaca else None
        for rep in range(s.reps):
            order = systems[rep % len(systems):] + systems[: rep % len(systems)]
            for system in order:
                work = root / f"rep{rep}-{system}"
                work.mkdir(parents=True, exist_ok=True)
                if system == "hf":
                    r = run_hf(s, model_dir, data, ds_path, work, env)
                elif system in ("hf_flat", "hf_pad"):
                    r = run_hf(s, model_dir, data, ds_path, work, env, collator=system[3:])
                else:
                    method = "lora" if system == "lora" else "allora"
                    r = run_allora(s, method, model_dir, data, ds_path, work, env,
                                   chunked_loss=system != "allora_full_logits", window=window)
                # per second of CPU time per rank: what one dedicated core per rank would give
                r["cpu_tokens_per_s"] = r["tokens"] / (r["cpu_s"] / s.world)
                if "examples" in r:
                    r["cpu_examples_per_s"] = r["examples"] / (r["cpu_s"] / s.world)
                runs.append({"rep": rep, "system": system, **r})
                extra = f"{r['examples_per_s']:6.2f} examples/s, " if "examples" in r else ""
                print(f"rep {rep} {system:>6}: {extra}{r['tokens_per_s']:7.1f} tokens/s, {r['cpu_tokens_per_s']:7.1f} "
                      f"per CPU-s per rank (window {r['seconds']:.1f} s, launch to exit {r['wall_s']:.0f} s, "
                      f"loss {r['final_loss']:.3f}, load {os.getloadavg()[0]:.1f})", flush=True)
    n_params = json.loads((model_dir.parent / "info.json").read_text())["parameters"]
    result = {**info, "setting": asdict(s), "parameters": n_params, "deepspeed_config": ds, "runs": runs,
              "loadavg_1m_end": machine()["loadavg_1m"], "wall_s": time.perf_counter() - t_start}
    if args.alpaca:
        result["data"] = {**json.loads((model_dir.parent / "info.json").read_text()).get("data", {}), "window": window}
    if args.alpaca:
        result["summary"] = summarise_alpaca(runs)
        result["goals"] = {"allora_over_hf_flat_min": GOAL_ALPACA_OVER_HF}
    elif set(systems) == set(all_systems):
        result["summary"] = summarise(runs)
        result["goals"] = {"allora_over_hf_min": GOAL_OVER_HF, "allora_time_over_lora_max": GOAL_ALLORA_OVER_LORA}
    write_json(args.out, result)
    (print_alpaca_report if args.alpaca else print_report)(result, args.out)
    return result


def print_report(res: dict, out: Path) -> None:
    s, m = res["setting"], res["machine"]
    print(f"\n{m['cpu']} ({m['logical_cpus']} logical CPUs, load {m['loadavg_1m']:.1f} at start, "
          f"{res['loadavg_1m_end']:.1f} at end), torch {m['torch']}, deepspeed {m['deepspeed']}, transformers "
          f"{m['transformers']}, peft {m.get('peft')}; wrote {out}")
    print(f"{res['parameters'] / 1e6:.1f}M-parameter Llama-3-architecture model, fp32, ZeRO-3, {s['world']} CPU ranks x 1 "
          f"thread, seq {s['seq_len']}, micro {s['micro']} x accumulation {s['gas']} ({s['micro'] * s['gas'] * s['world']} "
          f"sequences/step), r={s['rank']}; steps {s['timed_from'] + 1}-{s['steps']} timed, {s['reps']} repetition(s)")
    labels = {"allora": "allora_ds allora", "lora": "allora_ds lora", "hf": "HF Trainer + PEFT LoRA"}
    rows = []
    for system in SYSTEMS:
        mine = [r for r in res["runs"] if r["system"] == system]
        if mine:
            wall, cpu = [r["tokens_per_s"] for r in mine], [r["cpu_tokens_per_s"] for r in mine]
            rows.append([labels[system], median(wall), f"{min(wall):.0f}-{max(wall):.0f}", median(cpu),
                         f"{min(cpu):.0f}-{max(cpu):.0f}"])
    print(table(["system", "tokens/s", "range", "tokens/CPU-s/rank", "range"], rows, {1: ".1f", 3: ".1f"}))
    if "summary" in res:
        w, c = res["summary"]["tokens_per_s"], res["summary"]["cpu_tokens_per_s"]
        print(table(["paired ratio (median over repetitions)", "wall clock", "CPU time", "goal"], [
            ["allora_ds allora / HF (throughput)", w["allora_over_hf"], c["allora_over_hf"], f">= {GOAL_OVER_HF}"],
            ["allora_ds lora / HF (throughput)", w["lora_over_hf"], c["lora_over_hf"], "-"],
            ["allora / lora (step time)", w["allora_time_over_lora"], c["allora_time_over_lora"],
             f"<= {GOAL_ALLORA_OVER_LORA}"],
        ], {1: ".3f", 2: ".3f"}))


def print_alpaca_report(res: dict, out: Path) -> None:
    s, m, d = res["setting"], res["machine"], res.get("data", {})
    print(f"\n{m['cpu']} ({m['logical_cpus']} logical CPUs, load {m['loadavg_1m']:.1f} at start, "
          f"{res['loadavg_1m_end']:.1f} at end), torch {m['torch']}, deepspeed {m['deepspeed']}, transformers "
          f"{m['transformers']}, peft {m.get('peft')}; wrote {out}")
    print(f"{res['parameters'] / 1e6:.1f}M-parameter Llama-3-architecture model (hidden {s['hidden']}, {s['layers']} layers, "
          f"vocabulary {s['vocab']}), fp32, ZeRO-3, {s['world']} CPU ranks x 1 thread; alpaca rows "
          f"(prompt {d.get('prompt_tokens_mean', 0):.0f}, response {d.get('response_tokens_mean', 0):.0f} tokens on "
          f"average); micro-batch: allora_ds 1 packed row of <= {s['pack_len']} tokens, HF {s['hf_micro']} examples; "
          f"steps {s['timed_from'] + 1}-{s['steps']} timed, {s['reps']} repetition(s)")
    labels = {"allora": "allora_ds (packing, chunked loss)", "allora_full_logits": "allora_ds (packing, full-logits loss)",
              "hf_flat": "HF Trainer + PEFT, DataCollatorWithFlattening", "hf_pad": "HF Trainer + PEFT, padding"}
    rows = []
    for system in ALPACA_SYSTEMS:
        mine = [r for r in res["runs"] if r["system"] == system]
        if mine:
            ex = [r["examples_per_s"] for r in mine]
            rows.append([labels[system], median(ex), f"{min(ex):.2f}-{max(ex):.2f}", median([r["tokens_per_s"] for r in mine]),
                         median([r["cpu_examples_per_s"] for r in mine])])
    print(table(["system", "examples/s", "range", "tokens/s", "examples/CPU-s/rank"], rows, {1: ".3f", 3: ".1f", 4: ".3f"}))
    w, c = res["summary"]["examples_per_s"], res["summary"]["cpu_examples_per_s"]
    names = {"allora_over_hf_flat": "allora_ds / HF flattening", "allora_over_hf_pad": "allora_ds / HF padding",
             "allora_full_logits_over_hf_flat": "allora_ds full-logits loss / HF flattening",
             "allora_over_allora_full_logits": "allora_ds chunked / full-logits loss",
             "hf_flat_over_hf_pad": "HF flattening / HF padding"}
    print(table(["paired ratio of examples/s (median over repetitions)", "wall clock", "CPU time", "goal"],
                [[names[k], w[k], c[k], f">= {GOAL_ALPACA_OVER_HF}" if k == "allora_over_hf_flat" else "-"]
                 for k in names if k in w], {1: ".3f", 2: ".3f"}))


if __name__ == "__main__":
    main()
