"""Data: load with ``datasets``, render alpaca/chat/sharegpt/text, mask prompts, truncate, batch.

Every example becomes ``input_ids`` and ``labels`` (-100 where no loss: prompt, padding and the
first token of each example). Conversations are normalized by ``chat.py``, sources mixed by
``mixture.py``, rows packed by ``packing.py``. Tokenization is cached by ``datasets``; the trainer
runs it on one rank first so the others read the cache (``mixture.tokenizing_rank_first``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from allora_ds import chat, log
from allora_ds.config import DataConfig, DataSource, is_local_path
from allora_ds.errors import UserError
from allora_ds.packing import pack  # noqa: F401 - the pipeline's packing step, importable from here

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
ALPACA_FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}


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


def _source_spec(cfg: DataConfig, source: str) -> DataSource:
    """The one source of a config whose data is a single path (its format, fields and roles)."""
    return DataSource(path=source, format=cfg.format, split=cfg.split, text_field=cfg.text_field, fields=cfg.fields,
                      roles=cfg.roles)


def check_fields(ds, cfg: DataConfig, key: str, source: str, spec: DataSource | None = None) -> DataSource:
    """The source's spec with its format settled (a chat file holding 'conversations' is sharegpt),
    after checking that the records have the fields that format reads."""
    spec = dataclasses.replace(spec or _source_spec(cfg, source))
    names = chat.field_names("chat", spec.fields)
    if spec.format == "chat" and names["messages"] not in ds.column_names and "conversations" in ds.column_names \
            and "messages" not in spec.fields:
        log.info(f"{key}: {source} holds 'conversations': read as format sharegpt")
        spec.format = "sharegpt"
    if spec.format == "alpaca":
        fields = {**ALPACA_FIELDS, **spec.fields}
        need = [fields["instruction"], fields["output"]]
    elif spec.format == "text":
        need = [spec.text_field]
    else:
        need = [chat.field_names(spec.format, spec.fields)["messages"]]
    missing = [f for f in need if f not in ds.column_names]
    if missing:
        raise UserError(f"{key}: {source}: format {spec.format!r} needs field(s) {', '.join(map(repr, missing))}; "
                        f"found {', '.join(map(repr, ds.column_names))}")
    return spec


class Formatter:
    """Turns one record into ``(input_ids, labels)`` for the configured format."""

    def __init__(self, tokenizer, cfg: DataConfig, source: str, spec: DataSource | None = None):
        self.tok, self.source = tokenizer, source
        self.spec = spec or _source_spec(cfg, source)
        self.train_on = cfg.train_on
        if self.spec.format in ("chat", "sharegpt"):
            if not tokenizer.chat_template:
                raise UserError(f"data.format: {self.spec.format!r} needs a tokenizer with a chat template; "
                                f"{tokenizer.name_or_path} has none")
            self.template = chat.Template.of(tokenizer)
            self.names = chat.field_names(self.spec.format, self.spec.fields)
        self.alpaca = {**ALPACA_FIELDS, **self.spec.fields}

    def _bad(self, idx: int, msg: str):
        raise UserError(f"{self.source}: row {idx + 1}: {msg}")

    def _text(self, row, idx, field):
        v = row.get(field)
        if not isinstance(v, str):
            self._bad(idx, f"field {field!r} must be a string, got {type(v).__name__}")
        return v

    def __call__(self, row: dict, idx: int) -> tuple[list[int], list[int]]:
        fmt, tok = self.spec.format, self.tok
        if fmt == "alpaca":
            f = self.alpaca
            instr, out = self._text(row, idx, f["instruction"]), self._text(row, idx, f["output"])
            inp = row.get(f["input"]) or ""
            prompt = (ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT).format(instruction=instr, input=inp)
            p_ids = tok(prompt).input_ids
            r_ids = tok(out, add_special_tokens=False).input_ids + [tok.eos_token_id]
            return p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids
        if fmt == "text":
            ids = tok(self._text(row, idx, self.spec.text_field)).input_ids + [tok.eos_token_id]
            return ids, list(ids)
        try:
            messages, trained = chat.normalize(row.get(self.names["messages"]), fmt, self.spec.fields, self.spec.roles,
                                               self.template, self.train_on)
        except chat.ConversationError as e:
            self._bad(idx, str(e))
        return self._chat(messages, trained, idx)

    def _render(self, messages, idx, gen=False) -> str:
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except TemplateError as e:
            self._bad(idx, f"the tokenizer's chat template refused the conversation: {e}")

    def _chat(self, messages, trained, idx):
        full = self._render(messages, idx)
        spans = []  # character spans of trained assistant replies (incl. their end-of-turn token)
        for i, m in enumerate(messages):
            if trained[i]:
                if i == 0:  # its prompt would be an empty conversation, which templates do not render
                    self._bad(idx, "the conversation starts with an assistant turn, which answers no prompt; "
                                   "begin it with a system or user message")
                prompt, upto = self._render(messages[:i], idx, True), self._render(messages[: i + 1], idx)
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


def tokenize(ds, tokenizer, cfg: DataConfig, source: str, spec: DataSource | None = None):
    """Map records to ``input_ids``/``labels`` (truncated, first label masked); returns ``(dataset, stats)``."""
    fmt = Formatter(tokenizer, cfg, source, spec)
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
