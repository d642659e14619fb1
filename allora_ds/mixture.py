"""Sources -> the train and eval sets the trainer reads: each source loaded, checked and tokenized
(cached by ``datasets``), the sources mixed, the rows packed, and a report per source.

``data.train`` (and ``data.eval``) is one source or a list of them. Each source is taken whole, or
``count`` examples, or ``epochs`` passes (a seeded sample for the fraction), or, for sources with a
``weight``, interleaved with the other weighted ones by ``datasets.interleave_datasets`` at those
ratios. The mixture is drawn once from ``train.seed``; each epoch then shuffles its rows by
``(seed, epoch)`` (``data.epoch_order``), so the data order stays a pure function of both.
``prepare`` is the one code path of training and ``allora-data``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from allora_ds import log, packing
from allora_ds.config import Config, DataSource, is_local_path
from allora_ds.data import DataStats, check_fields, load_records, tokenize
from allora_ds.errors import UserError

SOURCE = "source"  # column naming the source of every mixed example, dropped before training


@dataclass
class SourceReport:
    key: str  # data.train, or data.train[i] for a list
    spec: DataSource
    stats: DataStats  # of the whole source, tokenized
    examples: int = 0  # in the mixture
    tokens: int = 0
    label_tokens: int = 0

    def describe(self) -> str:
        return (f"  {self.key} {self.spec.path} ({self.spec.format}, {self.spec.how_many()}): {self.examples:,} "
                f"examples in the mix of {self.stats.examples:,}, {self.tokens:,} tokens ({self.label_tokens:,} "
                f"with loss); of its rows {self.stats.truncated} truncated, {self.stats.dropped} dropped")


@dataclass
class SplitData:
    """One of the train and eval sets: rows (packed or not) and what went into them."""

    name: str
    rows: object  # datasets.Dataset
    stats: DataStats  # of the mixture's examples (truncated/dropped summed over the sources)
    sources: list[SourceReport] = field(default_factory=list)
    packed_rows: int | None = None  # None: not packed
    origin: str = ""  # where the rows were read from, if not tokenized now

    def report(self, max_len: int, strategy: str) -> list[str]:
        lines = [self.stats.describe(f"{self.name} data{self.origin}", max_len)]
        if len(self.sources) > 1:
            lines += [s.describe() for s in self.sources]
        if self.packed_rows is not None:
            eff = packing.efficiency(self.stats.tokens, self.packed_rows, max_len)
            lines.append(f"{self.name} data packed ({strategy}): {self.stats.examples:,} examples into "
                         f"{self.packed_rows:,} rows of {max_len} tokens, packing efficiency {eff:.1%} "
                         "(real tokens / row slots)")
        return lines


@dataclass
class PreparedData:
    train: SplitData
    eval: SplitData | None

    def report(self, cfg: Config) -> list[str]:
        d = cfg.data
        return [ln for s in (self.train, self.eval) if s is not None for ln in s.report(d.max_seq_len, d.packing_strategy)]


@contextlib.contextmanager
def tokenizing_rank_first(timeout_minutes: float, local_rank: int):
    """One rank tokenizes (filling the ``datasets`` cache) while the others wait, then they read the cache.

    When the cache is on a filesystem every node sees, that is rank 0 alone, not every node's local
    rank 0 (tokenizing the same data once per node). The others wait on a group of their own with
    ``timeout_minutes`` (data.tokenize_timeout_minutes), not in a collective of the training group,
    whose timeout (and NCCL's watchdog) is sized for collectives.
    """
    import datasets
    import torch.distributed as dist

    from allora_ds import distributed

    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    group = distributed.wait_group(timeout_minutes)
    shared = distributed.all_see(Path(datasets.config.HF_DATASETS_CACHE), group)
    log.info("data: rank 0 tokenizes for the whole job (the datasets cache is shared by every rank)" if shared else
             "data: local rank 0 of each node tokenizes (the datasets cache is not shared between nodes)")
    with distributed.first_then_others(dist.get_rank() == 0 if shared else local_rank == 0, group):
        yield
    dist.destroy_process_group(group)


def source_keys(value, which: str) -> list[str]:
    return [f"data.{which}"] if isinstance(value, str) else [f"data.{which}[{i}]" for i in range(len(value))]


def check_paths(cfg: Config) -> None:
    """Local sources that do not exist, named by key and path before anything else starts."""
    if cfg.data.tokenized:
        return
    for which in ("train", "eval"):
        value = getattr(cfg.data, which)
        if value is None:
            continue
        for key, src in zip(source_keys(value, which), cfg.data.sources(which)):
            if is_local_path(src.path) and not Path(src.path).expanduser().exists():
                raise UserError(f"{key}: {src.path} does not exist")


def _load(cfg: Config, which: str) -> list[tuple[str, DataSource, object]]:
    d = cfg.data
    value = getattr(d, which)
    if value is None:
        return []
    out = []
    for key, spec in zip(source_keys(value, which), d.sources(which)):
        rows = load_records(spec.path, spec.split, key)
        out.append((key, check_fields(rows, d, key, spec.path, spec), rows))
    return out


def _take(ds, n: int, seed: int):
    """``n`` examples of ``ds``: all of it as often as it fits whole, then a seeded sample of the rest."""
    import datasets

    whole, rest = divmod(n, len(ds))
    parts = [ds] * whole + ([ds.shuffle(seed=seed).select(range(rest))] if rest else [])
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def mix(parts: list[tuple[DataSource, object]], seed: int, stopping: str):
    """One dataset from tokenized sources: fixed shares concatenated, weighted ones interleaved."""
    import datasets

    fixed, weighted = [], []
    for i, (spec, ds) in enumerate(parts):
        if spec.weight is not None:
            weighted.append((spec.weight, ds))
        elif spec.count is not None or spec.epochs is not None:
            n = spec.count if spec.count is not None else max(1, round(spec.epochs * len(ds)))
            fixed.append(_take(ds, n, seed + i))
        else:
            fixed.append(ds)
    if weighted:
        total = sum(w for w, _ in weighted)
        fixed.append(datasets.interleave_datasets([ds for _, ds in weighted], probabilities=[w / total for w, _ in weighted],
                                                  seed=seed, stopping_strategy=stopping))
    return fixed[0] if len(fixed) == 1 else datasets.concatenate_datasets(fixed)


def _split(name: str, loaded, cfg: Config, tokenizer) -> SplitData:
    d = cfg.data
    several = len(loaded) > 1
    reports, parts = [], []
    for i, (key, spec, rows) in enumerate(loaded):
        # The source's key and path lead every row error; a single source keeps its path alone.
        ds, stats = tokenize(rows, tokenizer, d, f"{key}: {spec.path}" if several else spec.path, spec)
        reports.append(SourceReport(key, spec, stats))
        parts.append((spec, ds.add_column(SOURCE, [i] * len(ds)) if several else ds))
    mixed = mix(parts, cfg.train.seed, d.mixing)
    lengths = [len(x) for x in mixed["input_ids"]]
    labels = mixed["n_labels"]
    stats = DataStats(examples=len(mixed), tokens=sum(lengths), label_tokens=sum(labels),
                      truncated=sum(r.stats.truncated for r in reports), dropped=sum(r.stats.dropped for r in reports))
    if several:
        for src, n, n_lab in zip(mixed[SOURCE], lengths, labels):
            r = reports[src]
            r.examples, r.tokens, r.label_tokens = r.examples + 1, r.tokens + n, r.label_tokens + n_lab
        mixed = mixed.remove_columns(SOURCE)
    else:
        reports[0].examples, reports[0].tokens, reports[0].label_tokens = stats.examples, stats.tokens, stats.label_tokens
    out = SplitData(name, mixed, stats, reports)
    if d.packing_strategy != "none":
        out.rows = packing.pack(mixed, d.max_seq_len, d.packing_strategy)
        out.packed_rows = len(out.rows)
    return out


def prepare(cfg: Config, tokenizer) -> PreparedData:
    """The tokenized (mixed, packed) train and eval sets of ``cfg.data``, or the pre-tokenized ones of
    ``data.tokenized`` after checking they were made the same way."""
    if cfg.data.tokenized:
        from allora_ds import pretokenized

        return pretokenized.load(cfg, tokenizer)
    d = cfg.data
    train = _load(cfg, "train")
    evals = _load(cfg, "eval")
    if not evals and d.eval_fraction > 0:  # held out of each source before mixing: no example is in both
        for n, (key, spec, rows) in enumerate(train):
            split = rows.train_test_split(test_size=d.eval_fraction, seed=cfg.train.seed)
            train[n] = (key, spec, split["train"])
            evals.append((key, spec, split["test"]))
        evals = [(k, dataclasses.replace(s, weight=None, count=None, epochs=None), r)
                 for k, s, r in evals]  # held-out examples are evaluated once each
    return PreparedData(_split("train", train, cfg, tokenizer), _split("eval", evals, cfg, tokenizer) if evals else None)
