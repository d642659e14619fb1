"""Data: load with ``datasets``, render alpaca/chat/text, mask prompts, truncate, pack, batch.

Every example becomes ``input_ids`` and ``labels`` (-100 where no loss: prompt, padding and the
first token of each example). Tokenization is cached by ``datasets``; the trainer runs it on
local rank 0 first so the other ranks read the cache.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from allora_ds.config import DataConfig, is_local_path
from allora_ds.errors import UserError

IGNORE = -100
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
REQUIRED_FIELDS = {"alpaca": ("instruction", "output"), "chat": ("messages",)}


def _first_bad_json_line(path: Path) -> str | None:
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})"
                if not isinstance(row, dict):
                    return f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}"
    return None


def load_records(source: str, split: str, key: str):
    """A ``datasets.Dataset`` from a local file, a directory of files, or a hub dataset name."""
    import datasets

    p = Path(source).expanduser()
    try:
        if p.is_file():
            builder = FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise UserError(f"{key}: {p}: unsupported file type {p.suffix!r} (use {', '.join(FILE_BUILDERS)})")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        elif p.is_dir():
            ds = datasets.load_dataset(str(p), split=split)
        elif is_local_path(source) or p.suffix.lower() in FILE_BUILDERS:
            raise UserError(f"{key}: {source} does not exist")
        else:
            ds = datasets.load_dataset(source, split=split)
    except UserError:
        raise
    except StopIteration:  # datasets' json reader on an empty file
        raise UserError(f"{key}: {source} is empty") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types; find the user's mistake if we can
        if p.is_file() and p.suffix.lower() in (".jsonl", ".json"):
            bad = _first_bad_json_line(p) if p.suffix.lower() == ".jsonl" else None
            if bad:
                raise UserError(f"{key}: {bad}") from None
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{key}: cannot load {source!r}: {type(e).__name__}: {first_line}") from None
    if len(ds) == 0:
        raise UserError(f"{key}: {source} has no rows")
    return ds


def check_fields(ds, cfg: DataConfig, key: str, source: str) -> None:
    need = REQUIRED_FIELDS.get(cfg.format, (cfg.text_field,))
    missing = [f for f in need if f not in ds.column_names]
    if missing:
        raise UserError(f"{key}: {source}: format {cfg.format!r} needs field(s) {', '.join(map(repr, missing))}; "
                        f"found {', '.join(map(repr, ds.column_names))}")


class Formatter:
    """Turns one record into ``(input_ids, labels)`` for the configured format."""

    def __init__(self, tokenizer, cfg: DataConfig, source: str):
        self.tok, self.cfg, self.source = tokenizer, cfg, source
        if cfg.format == "chat" and not tokenizer.chat_template:
            raise UserError(f"data.format: 'chat' needs a tokenizer with a chat template; {tokenizer.name_or_path} has none")

    def _bad(self, idx: int, msg: str):
        raise UserError(f"{self.source}: row {idx + 1}: {msg}")

    def _text(self, row, idx, field):
        v = row.get(field)
        if not isinstance(v, str):
            self._bad(idx, f"field {field!r} must be a string, got {type(v).__name__}")
        return v

    def __call__(self, row: dict, idx: int) -> tuple[list[int], list[int]]:
        fmt, tok = self.cfg.format, self.tok
        if fmt == "alpaca":
            instr, out = self._text(row, idx, "instruction"), self._text(row, idx, "output")
            inp = row.get("input") or ""
            prompt = (ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT).format(instruction=instr, input=inp)
            p_ids = tok(prompt).input_ids
            r_ids = tok(out, add_special_tokens=False).input_ids + [tok.eos_token_id]
            return p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids
        if fmt == "text":
            ids = tok(self._text(row, idx, self.cfg.text_field)).input_ids + [tok.eos_token_id]
            return ids, list(ids)
        return self._chat(row.get("messages"), idx)

    def _chat(self, messages, idx):
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                     for m in messages):
            self._bad(idx, "'messages' must be a list of {role, content} objects")
        if not any(m["role"] == "assistant" for m in messages):
            self._bad(idx, "the conversation has no assistant turn to learn from")
        render = lambda msgs, gen=False: self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
        full = render(messages)
        spans = []  # character spans of assistant replies (incl. their end-of-turn token)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                if i == 0:  # its prompt would be an empty conversation, which templates do not render
                    self._bad(idx, "the conversation starts with an assistant turn, which answers no prompt; "
                                   "begin it with a system or user message")
                prompt, upto = render(messages[:i], True), render(messages[: i + 1])
                if not (full.startswith(prompt) and full.startswith(upto)):
                    self._bad(idx, "the tokenizer's chat template does not render conversations prefix by prefix")
                spans.append((len(prompt), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc.input_ids
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _) in zip(ids, enc.offset_mapping)]
        return ids, labels


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def describe(self, name: str, max_len: int) -> str:
        return (f"{name}: {self.examples} examples, {self.tokens:,} tokens ({self.label_tokens:,} with loss); "
                f"{self.truncated} truncated to {max_len} tokens, {self.dropped} dropped (no response left)")


def tokenize(ds, tokenizer, cfg: DataConfig, source: str):
    """Map records to ``input_ids``/``labels`` (truncated, first label masked); returns ``(dataset, stats)``."""
    fmt = Formatter(tokenizer, cfg, source)
    max_len = cfg.max_seq_len

    def encode(row, idx):
        ids, labels = fmt(row, idx)
        truncated = len(ids) > max_len
        ids, labels = ids[:max_len], labels[:max_len]
        labels[0] = IGNORE  # never predicted; also keeps packed examples from predicting each other
        return {"input_ids": ids, "labels": labels, "truncated": truncated,
                "n_labels": sum(1 for t in labels if t != IGNORE)}

    out = ds.map(encode, with_indices=True, remove_columns=ds.column_names, num_proc=cfg.num_proc,
                 desc=f"tokenizing {Path(source).name}")
    stats = DataStats(examples=len(out), truncated=int(sum(out["truncated"])))
    keep = [i for i, n in enumerate(out["n_labels"]) if n > 0]
    stats.dropped = len(out) - len(keep)
    if stats.dropped:
        out = out.select(keep)
    if len(out) == 0:
        raise UserError(f"{source}: no example has response tokens within data.max_seq_len={max_len}")
    stats.label_tokens = int(sum(out["n_labels"]))
    out = out.remove_columns(["truncated"])  # n_labels stays: the trainer sums it per step
    stats.tokens = int(sum(len(x) for x in out["input_ids"]))
    stats.examples = len(out)
    return out, stats


def pack(ds, max_len: int):
    """Greedy in-order packing of whole examples into rows of at most ``max_len`` tokens.

    ``position_ids`` restart at 0 for each example; with no attention mask, transformers
    derives a block-diagonal causal mask from them, so examples do not attend to each other.
    """

    def pack_batch(batch):
        rows = {"input_ids": [], "labels": [], "position_ids": [], "n_labels": []}
        empty = lambda: {"input_ids": [], "labels": [], "position_ids": [], "n_labels": 0}  # noqa: E731
        cur = empty()
        for ids, labels, n in zip(batch["input_ids"], batch["labels"], batch["n_labels"]):
            if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > max_len:
                for k in rows:
                    rows[k].append(cur[k])
                cur = empty()
            cur["input_ids"] += ids
            cur["labels"] += labels
            cur["position_ids"] += list(range(len(ids)))
            cur["n_labels"] += n
        if cur["input_ids"]:
            for k in rows:
                rows[k].append(cur[k])
        return rows

    return ds.map(pack_batch, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="packing")


@functools.lru_cache(maxsize=2)  # called every step; the order changes once per epoch
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``n`` examples for ``epoch``: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def rounds_per_epoch(n: int, micro: int, world: int) -> int:
    """Micro-batch rounds per epoch (each round: ``micro`` examples on every rank; the rest dropped)."""
    return n // (micro * world)


def rank_micro_batch(order: list[int], rnd: int, micro: int, world: int, rank: int) -> list[int]:
    start = (rnd * world + rank) * micro
    return order[start : start + micro]


def collate(rows: list[dict], pad_id: int, flatten: bool = False) -> dict:
    """One micro-batch of tensors from tokenized (and possibly packed) rows.

    ``flatten=False`` (sdpa, eager, flex): one row per sequence, right-padded to the longest; padding
    gets label -100 and either an attention mask (unpacked) or positions of its own (packed: with no
    mask, transformers builds a block-diagonal causal mask per row from the restarted positions).

    ``flatten=True`` (flash attention): the whole micro-batch becomes ONE row with no padding,
    positions restarting at every example, plus ``cu_seq_lens_*``/``max_length_*`` for the varlen
    kernel. transformers reads example boundaries from ``position_ids`` under flash attention only
    for a batch of one row; with more rows packed examples would attend to each other. Passing the
    boundaries also spares the kernel a host sync per layer to infer them.
    """
    if flatten:
        return _flatten(rows)
    n = max(len(r["input_ids"]) for r in rows)
    packed = "position_ids" in rows[0]
    batch = {"input_ids": [], "labels": []}
    batch["position_ids" if packed else "attention_mask"] = []
    for r in rows:
        pad = n - len(r["input_ids"])
        batch["input_ids"].append(r["input_ids"] + [pad_id] * pad)
        batch["labels"].append(r["labels"] + [IGNORE] * pad)
        if packed:
            batch["position_ids"].append(r["position_ids"] + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def _flatten(rows: list[dict]) -> dict:
    ids, labels, positions = [], [], []
    for r in rows:
        ids += r["input_ids"]
        labels += r["labels"]  # the first label of every example is already -100 (see tokenize)
        positions += r.get("position_ids") or list(range(len(r["input_ids"])))
    lengths = example_lengths({"position_ids": positions})
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    row = lambda v: torch.tensor([v], dtype=torch.long)  # noqa: E731
    return {"input_ids": row(ids), "labels": row(labels), "position_ids": row(positions),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}


def example_lengths(row: dict) -> list[int]:
    """Token counts of the examples in a row (several when packed: positions restart at each)."""
    pos = row.get("position_ids")
    if pos is None:
        return [len(row["input_ids"])]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [b - a for a, b in zip(starts, starts[1:])]


def label_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE).sum())
