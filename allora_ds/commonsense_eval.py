"""allora-eval: commonsense-reasoning accuracy the way the ALLoRA/DoRA papers measure it.

    allora-eval --model runs/cs-8b/export/merged --data dataset/ --output runs/cs-8b/eval
    allora-eval --model runs/cs-8b --data dataset/ --output runs/cs-8b/eval          # newest checkpoint + its base
    allora-eval --model out/adapter --base /models/Meta-Llama-3-8B --data dataset/boolq/test.json --output ev
    torchrun --nproc-per-node 8 -m allora_ds.commonsense_eval --model ... --data dataset/ --output ...

The protocol of LLM-Adapters' and DoRA's ``commonsense_evaluate.py``: each test example's instruction
goes into the training prompt, the model continues it (no sampling, 4 beams, at most 32 new tokens),
and the first answer label in the continuation (``true``/``false`` for BoolQ, ``solution1``/``2`` for
PIQA, ...) is compared with the example's ``answer``; a continuation with no label counts as wrong.
Examples are sorted by length and generated in left-padded batches; under a ``torchrun``/``deepspeed``
launch every rank takes an interleaved shard and rank 0 gathers, scores and writes
``eval_results.json`` and ``predictions.jsonl``. Protocol details and sources: docs/eval.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from allora_ds import log
from allora_ds.data import ALPACA_PROMPT, ALPACA_PROMPT_INPUT
from allora_ds.errors import UserError, cli

RESULTS_FILE, PREDICTIONS_FILE = "eval_results.json", "predictions.jsonl"
RESPONSE_MARK = "### Response:"
ANSWERS = tuple(f"answer{i}" for i in range(1, 6))


@dataclass(frozen=True)
class Task:
    """A benchmark: its LLM-Adapters directory name, the paper's column name, the labels extracted."""

    name: str
    column: str
    labels: tuple[str, ...]


# In the papers' column order. The label sets are the reference's extraction patterns (answer1..5
# for every ``answerN`` dataset, even those with fewer choices).
TASKS = (
    Task("boolq", "BoolQ", ("true", "false")),
    Task("piqa", "PIQA", ("solution1", "solution2")),
    Task("social_i_qa", "SIQA", ANSWERS),
    Task("hellaswag", "HellaSwag", tuple(f"ending{i}" for i in range(1, 5))),
    Task("winogrande", "WinoGrande", ("option1", "option2")),
    Task("ARC-Easy", "ARC-e", ANSWERS),
    Task("ARC-Challenge", "ARC-c", ANSWERS),
    Task("openbookqa", "OBQA", ANSWERS),
)
ALIASES = {"siqa": "social_i_qa", "arc-e": "ARC-Easy", "arc_easy": "ARC-Easy", "arc-c": "ARC-Challenge",
           "arc_challenge": "ARC-Challenge", "obqa": "openbookqa"}
BY_NAME = {t.name.lower(): t for t in TASKS} | {a: next(t for t in TASKS if t.name == n) for a, n in ALIASES.items()}
TEMPLATES = ("alpaca", "llm-adapters")


def extract_answer(generation: str, labels: tuple[str, ...]) -> str:
    """The first of ``labels`` that occurs in the response, or ``""`` (scored wrong).

    As the reference: the text after the last ``### Response:`` (a model may repeat the prompt's
    marker), a case-sensitive search anywhere in it, the leftmost match wins.
    """
    text = generation.split(RESPONSE_MARK)[-1].strip()
    m = re.search("|".join(map(re.escape, labels)), text)
    return m.group(0) if m else ""


def render_prompt(row: dict, template: str = "alpaca") -> str:
    """The prompt for one test row: the project's training template, or the reference's verbatim."""
    if template == "alpaca":
        inp = row.get("input") or ""
        return (ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT).format(instruction=row["instruction"], input=inp)
    # LLM-Adapters/DoRA evaluate with an indented triple-quoted string: the same Alpaca text plus a
    # trailing space on the first line and 16 spaces before each later line; ``input`` is not passed.
    pad = " " * 16
    header = ALPACA_PROMPT.split("\n\n", 1)[0]
    return f"{header} \n\n{pad}### Instruction:\n{pad}{row['instruction']}\n\n{pad}### Response:\n{pad}"


# ---------------------------------------------------------------------------------------------
# test data


@dataclass
class TestSet:
    name: str
    task: Task
    path: Path
    rows: list[dict]


TestSet.__test__ = False  # a data class, not a pytest test


def dataset_name(path: Path) -> str:
    """LLM-Adapters keeps each benchmark in ``dataset/NAME/test.json``; otherwise the file's stem."""
    return path.parent.name if path.stem == "test" else path.stem


def _read_rows(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--data: cannot read {path}: {e}") from None
    if not text.strip():
        raise UserError(f"--data: {path} is empty")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"--data: {path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--data: {path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rows, list):
        raise UserError(f"--data: {path}: expected a JSON list of examples, got {type(rows).__name__}")
    return rows


def _check_rows(rows: list, path: Path) -> None:
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"--data: {path}: example {i} is a {type(row).__name__}, not an object")
        for key in ("instruction", "answer"):
            if key not in row:
                raise UserError(f"--data: {path}: example {i} has no field {key!r} (found {', '.join(map(repr, row))}; "
                                "expected the LLM-Adapters fields instruction, input, output, answer)")
            if not isinstance(row[key], str):
                raise UserError(f"--data: {path}: example {i}: field {key!r} must be a string, got {type(row[key]).__name__}")
        if not isinstance(row.get("input") or "", str):
            raise UserError(f"--data: {path}: example {i}: field 'input' must be a string")


def _infer_task(name: str, rows: list) -> Task | None:
    """A task for a file whose name is not one of the eight: the label set its answers belong to."""
    golds = {r.get("answer") for r in rows if isinstance(r, dict)}
    for t in TASKS:
        if golds <= set(t.labels):
            return Task(name, name, t.labels)
    return None


def read_test_set(path: Path, strict: bool = True) -> TestSet | None:
    """One test file; ``strict=False`` (inside a directory) returns None for non-commonsense files."""
    name = dataset_name(path)
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"--data: {path} has no examples")
    task = BY_NAME.get(name.lower()) or _infer_task(name, rows)
    if task is None:
        if not strict:
            return None
        found = sorted({str(r.get("answer")) for r in rows if isinstance(r, dict)})[:4]
        raise UserError(f"--data: {path}: {name!r} is not one of the eight commonsense sets and its answers "
                        f"({', '.join(found)}, ...) fit no answer format (true/false, solutionN, answerN, endingN, optionN)")
    _check_rows(rows, path)
    for i, row in enumerate(rows, 1):
        if row["answer"] not in task.labels:
            raise UserError(f"--data: {path}: example {i}: answer {row['answer']!r} is not one of "
                            f"{'/'.join(task.labels)}, the labels {task.name} is scored on")
    return TestSet(name, task, path, rows)


def load_test_sets(paths: list[str], limit: int | None = None) -> list[TestSet]:
    """Test sets from files and directories (``DIR/NAME/test.json`` or ``DIR/NAME.json``), in the paper's order."""
    sets, notes = [], []
    for spec in paths:
        p = Path(spec).expanduser()
        if p.is_file():
            sets.append(read_test_set(p))
        elif p.is_dir():
            files = [c / f for c in sorted(p.iterdir()) if c.is_dir() for f in ("test.json", "test.jsonl")
                     if (c / f).is_file()]
            files += [c for c in sorted(p.iterdir()) if c.is_file() and c.suffix in (".json", ".jsonl")]
            found = [(f, read_test_set(f, strict=False)) for f in files]
            notes += [f"skipping {f}: not a commonsense test set" for f, s in found if s is None]
            if not any(s for _, s in found):
                raise UserError(f"--data: {p} holds no commonsense test file (expected NAME/test.json or NAME.json "
                                "with instruction and answer fields)")
            sets += [s for _, s in found if s]
        else:
            raise UserError(f"--data: {spec} does not exist")
    seen: dict[str, Path] = {}
    for s in sets:
        if s.name in seen:
            raise UserError(f"--data: two test sets named {s.name!r}: {seen[s.name]} and {s.path}")
        seen[s.name] = s.path
        if limit:
            s.rows = s.rows[:limit]
    for n in notes:
        log.info(n, every_rank=True)
    order = {t.name: i for i, t in enumerate(TASKS)}
    return sorted(sets, key=lambda s: (order.get(s.task.name, len(TASKS)), s.name))


# ---------------------------------------------------------------------------------------------
# scoring and reports


def score(sets: list[TestSet], generations: dict[tuple[str, int], str]) -> tuple[dict, list[dict]]:
    """Per-dataset results (accuracy in percent) and one prediction record per example."""
    results, preds = {}, []
    for s in sets:
        correct = unparsed = 0
        for i, row in enumerate(s.rows):
            text = generations[(s.name, i)]
            pred = extract_answer(text, s.task.labels)
            ok = pred == row["answer"]
            correct += ok
            unparsed += pred == ""
            preds.append({"id": f"{s.name}/{i}", "dataset": s.name, "index": i, "generation": text,
                          "prediction": pred, "answer": row["answer"], "correct": ok})
        n = len(s.rows)
        results[s.name] = {"column": s.task.column, "file": str(s.path), "examples": n, "correct": correct,
                           "accuracy": 100.0 * correct / n, "unparsed": unparsed}
    return results, preds


def average(results: dict) -> float:
    """Unweighted mean of the per-dataset accuracies, as the papers' Average column."""
    return sum(r["accuracy"] for r in results.values()) / len(results)


def format_table(results: dict) -> str:
    w = max(12, *(len(f"{r['column']} ({n})") for n, r in results.items()))
    lines = [f"{'dataset':<{w}}  {'examples':>8}  {'accuracy':>8}  {'unparsed':>8}"]
    for n, r in results.items():
        name = r["column"] if r["column"] == n else f"{r['column']} ({n})"
        lines.append(f"{name:<{w}}  {r['examples']:>8}  {r['accuracy']:>8.2f}  {r['unparsed']:>8}")
    label = "average" if len(results) == len(TASKS) else f"average of {len(results)}"
    lines.append(f"{label:<{w}}  {'':>8}  {average(results):>8.2f}")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(out: Path, summary: dict, preds: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / PREDICTIONS_FILE, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    _write_atomic(out / RESULTS_FILE, json.dumps(summary, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# the run


def shard(keys: list, rank: int, world: int) -> list:
    """Rank ``rank``'s share of length-sorted work: every ``world``-th item, so shards are balanced."""
    return keys[rank::world]


def _distributed() -> tuple[int, int, int]:
    """Join the process group a launcher (deepspeed, torchrun, srun) describes; else a world of one.

    Plain torch.distributed, not DeepSpeed's init: evaluation needs one gather, and on CPU
    DeepSpeed's communication backend would first JIT-build an op and map a shared-memory buffer.
    """
    from allora_ds.launch_env import check_launch_env

    check_launch_env()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # all_gather_object on NCCL uses the current device
    # Ranks meet once, after generating; a generous timeout keeps NCCL's watchdog from aborting a rank
    # that finished its shard early while a slower one is still generating.
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=6))
    return dist.get_rank(), dist.get_world_size(), local_rank


def _gather(items: list, world: int) -> list:
    if world == 1:
        return items
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, items)  # once per run: the pickled strings are small
    return [x for part in parts for x in part]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="allora-eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="merged model dir, PEFT adapter dir, training checkpoint (RUN/checkpoints/step-N) or run dir")
    p.add_argument("--base", help="base model for an adapter or checkpoint (default: the one it names)")
    p.add_argument("--data", required=True, nargs="+",
                   help="test files (LLM-Adapters JSON: instruction, input, output, answer) or directories of them")
    p.add_argument("--output", required=True, type=Path, help="directory for eval_results.json and predictions.jsonl")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call, per rank (reference: 1)")
    p.add_argument("--num-beams", type=int, default=4, help="beam width; 1 = greedy (reference: 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length limit (reference: 32)")
    p.add_argument("--template", choices=TEMPLATES, default="alpaca",
                   help="alpaca: the training prompt of allora-train; llm-adapters: the reference's eval prompt verbatim")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--limit", type=int, help="only the first N examples of each test set (a quick check)")
    p.add_argument("--device-map", choices=["auto"], help="split one model over all visible GPUs (one process)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="vllm: optional, one process, needs a GPU")
    p.add_argument("--tensor-parallel", type=int, default=1, help="vLLM tensor-parallel size")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub to run")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --output")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for key in ("batch_size", "num_beams", "max_new_tokens", "limit", "tensor_parallel"):
        v = getattr(a, key)
        if v is not None and v < 1:
            raise UserError(f"--{key.replace('_', '-')}: must be a positive integer, got {v}")
    return a


def evaluate(a) -> dict:
    """The whole evaluation (every rank runs it); returns the summary written to eval_results.json."""
    from allora_ds.inference import generate, generate_vllm, load_model, load_tokenizer, resolve_source

    if (a.output / RESULTS_FILE).exists() and not a.overwrite:
        raise UserError(f"--output: {a.output} already has {RESULTS_FILE} (pass --overwrite to replace it)")
    sets = load_test_sets(a.data, a.limit)
    source = resolve_source(a.model, a.base)
    rank, world, local_rank = _distributed()
    if world > 1 and (a.backend == "vllm" or a.device_map):
        raise UserError("--backend vllm / --device-map auto run one process over all GPUs: launch without torchrun/deepspeed")
    cuda = torch.cuda.is_available()
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    say = log.info
    say(f"{sum(len(s.rows) for s in sets)} examples in {len(sets)} test set(s): {', '.join(s.name for s in sets)}")

    t0 = time.perf_counter()
    tok = load_tokenizer(source, a.trust_remote_code)
    work = [((s.name, i), tok(render_prompt(row, a.template)).input_ids) for s in sets for i, row in enumerate(s.rows)]
    work.sort(key=lambda kv: (-len(kv[1]), kv[0]))  # longest first: little padding, and memory fails early
    mine = shard(work, rank, world)
    if a.backend == "vllm":
        model = None
        texts = generate_vllm(source, tok, [ids for _, ids in mine], a.num_beams, a.max_new_tokens, dtype,
                              a.tensor_parallel)
        t_load = 0.0
    else:
        device = f"cuda:{local_rank}" if cuda else "cpu"
        model = load_model(source, dtype, device, a.device_map, a.trust_remote_code)
        t_load = time.perf_counter() - t0
        say(f"loaded {source.describe()} ({dtype}, {world} rank(s)) in {t_load:.1f} s")
        bar = None
        if rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(mine), desc="generating (rank 0)", unit="ex", dynamic_ncols=True)
        t1 = time.perf_counter()
        texts = generate(model, tok, [ids for _, ids in mine], a.batch_size, a.num_beams, a.max_new_tokens,
                         on_batch=bar.update if bar else None)
        if bar:
            bar.close()
    gathered = _gather([(key, text) for (key, _), text in zip(mine, texts)], world)
    t_gen = time.perf_counter() - (t1 if model is not None else t0)
    summary = {}
    if rank == 0:
        results, preds = score(sets, dict(gathered))
        summary = {
            "model": str(source.path), "kind": source.kind, "base": source.base,
            "protocol": {"template": a.template, "num_beams": a.num_beams, "max_new_tokens": a.max_new_tokens,
                         "do_sample": False, "batch_size": a.batch_size, "dtype": dtype, "backend": a.backend,
                         "extraction": "first answer label in the response (case-sensitive); none = wrong"},
            "datasets": results, "average": average(results), "examples": len(work), "world_size": world,
            "load_s": round(t_load, 2), "generation_s": round(t_gen, 2), "examples_per_s": len(work) / t_gen,
        }
        write_outputs(a.output, summary, preds)
        print(format_table(results), flush=True)
        say(f"{len(work)} examples in {t_gen:.1f} s: {len(work) / t_gen:.2f} examples/s on {world} rank(s); "
            f"results in {a.output}/{RESULTS_FILE}, {PREDICTIONS_FILE}")
    return summary


@cli
def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")  # raised inside PEFT
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "loaded ..." line instead of a bar per weight file and rank
    a = parse_args(sys.argv[1:] if argv is None else argv)
    evaluate(a)
    from allora_ds.distributed import leave_process_group

    leave_process_group()  # rank 0 has written the results before any rank tears the group down


if __name__ == "__main__":
    main()
