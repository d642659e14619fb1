"""Packing whole examples into rows of at most ``max_seq_len`` tokens: greedy in order, or best-fit decreasing.

A strategy only decides which examples share a row (``bins``: lists of example indices); one
materialiser (``pack``) writes the rows, with ``position_ids`` restarting at 0 for each example.
With no attention mask transformers derives a block-diagonal causal mask from them (flash attention
gets the boundaries as ``cu_seq_lens``, see ``data.collate``), so examples never attend to each other.

Both strategies are pure functions of the example lengths, so the rows, and the data order that
shuffles them per ``(seed, epoch)``, are the same on every rank and every run.

* greedy: in dataset order, a new row whenever the next example does not fit.
* bfd: best-fit decreasing (as axolotl's multipack sampler and TRL's ``bfd`` strategy): longest
  example first, each into the fullest row it still fits. Typically within a few tenths of a percent
  of the fewest rows possible; rows then mix long and short examples.
"""

from __future__ import annotations

import bisect
import hashlib
from pathlib import Path

# Greedy packing was done per block of 1,000 examples (one datasets.map batch) before the strategies
# existed; keeping the block boundaries keeps its rows, and so resumed runs' data, exactly as they were.
GREEDY_BLOCK = 1000


def greedy_bins(lengths: list[int], max_len: int) -> list[list[int]]:
    bins: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not bins or i % GREEDY_BLOCK == 0 or used + n > max_len:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


def bfd_bins(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing in O(n log n): rows are kept in buckets by their free space."""
    bins: list[list[int]] = []
    free: list[int] = []  # sorted distinct free-space values that some open row has
    rows_with: dict[int, list[int]] = {}  # free space -> rows (indices into bins) with exactly that much
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):  # stable: ties keep dataset order
        n = lengths[i]
        at = bisect.bisect_left(free, n)
        if at < len(free):  # the fullest row that still fits
            space = free[at]
            b = rows_with[space].pop()
            if not rows_with[space]:
                del rows_with[space]
                free.pop(at)
        else:
            space, b = max_len, len(bins)
            bins.append([])
        bins[b].append(i)
        left = space - n
        if left > 0:
            if left not in rows_with:
                rows_with[left] = []
                bisect.insort(free, left)
            rows_with[left].append(b)
    return bins


STRATEGIES = {"greedy": greedy_bins, "bfd": bfd_bins}


def pack(ds, max_len: int, strategy: str = "greedy"):
    """Rows of whole examples of ``ds`` (tokenized: input_ids, labels, n_labels) packed by ``strategy``."""
    import datasets

    lengths = [len(x) for x in ds["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than max_len={max_len}")
    bins = STRATEGIES[strategy](lengths, max_len)
    columns = ["input_ids", "labels", "n_labels"]

    def rows(batch):
        members = [i for b in batch["members"] for i in b]
        got = ds.select_columns(columns)[members]  # one read of the whole batch's examples
        out = {"input_ids": [], "labels": [], "position_ids": [], "n_labels": []}
        k = 0
        for b in batch["members"]:
            part = range(k, k + len(b))
            k += len(b)
            out["input_ids"].append([t for j in part for t in got["input_ids"][j]])
            out["labels"].append([t for j in part for t in got["labels"][j]])
            out["position_ids"].append([p for j in part for p in range(len(got["input_ids"][j]))])
            out["n_labels"].append(sum(got["n_labels"][j] for j in part))
        return out

    # The rows are cached beside the tokenized examples, keyed by them and by how they are packed.
    fingerprint = hashlib.sha256(f"{ds._fingerprint} {strategy} {max_len}".encode()).hexdigest()[:16]
    cache = None
    if ds.cache_files:
        cache = str(Path(ds.cache_files[0]["filename"]).parent / f"packed-{fingerprint}.arrow")
    index = datasets.Dataset.from_dict({"members": bins})
    return index.map(rows, batched=True, batch_size=1000, remove_columns=["members"], desc=f"packing ({strategy})",
                     new_fingerprint=fingerprint, cache_file_name=cache)


def efficiency(n_tokens: int, n_rows: int, max_len: int) -> float:
    """Real tokens over row slots (rows x max_len): 1.0 is no padding at all."""
    return n_tokens / max(n_rows * max_len, 1)
