"""allora-data: see what a config will train on, or tokenize it once for a cluster.

    allora-data configs/llama3_8b_allora.yaml                 # the data report and 5 examples
    allora-data CONFIG.yaml data.packing=bfd -n 2             # overrides as for allora-train
    allora-data CONFIG.yaml --save /shared/tok/run1           # pre-tokenize (and pack); then train
    allora-train CONFIG.yaml data.tokenized=/shared/tok/run1  #   with no tokenizer pass

It reads the data exactly as ``allora-train`` does (``mixture.prepare``: the same tokenization, the
same ``datasets`` cache) and prints the report the trainer prints, the length percentiles and a
histogram, the labelled fraction and examples with their trained tokens marked: green on a
terminal, ``[[...]]`` when piped. It never writes to ``train.output_dir``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from allora_ds import mixture, pretokenized
from allora_ds.config import load_config
from allora_ds.data import IGNORE, epoch_order, example_lengths
from allora_ds.errors import UserError, cli

GREEN, RESET = "\033[32m", "\033[0m"


def percentiles(values: list[int], qs=(50, 90, 99)) -> dict:
    s = sorted(values)
    return {**{f"p{q}": s[min(len(s) - 1, (len(s) * q) // 100)] for q in qs}, "max": s[-1]}


def histogram(values: list[int], top: int, bins: int = 8, width: int = 40) -> list[str]:
    """Counts of ``values`` in ``bins`` equal ranges of [0, top], as lines of '#' bars."""
    step = max(1, -(-top // bins))
    counts = [0] * bins
    for v in values:
        counts[min((v - 1) // step, bins - 1) if v > 0 else 0] += 1
    most = max(counts) or 1
    return [f"  {k * step + 1:>6}-{min((k + 1) * step, top):<6} {c:>9,} {'#' * round(width * c / most)}"
            for k, c in enumerate(counts)]


def mark(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    """The example's text with its trained tokens marked. Text is decoded by prefixes so that every
    piece reads as it does within the whole (tokenizers drop a leading space when decoding alone)."""
    out, prev, start = [], "", 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or (labels[k] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(ids[:k])
            piece, prev = text[len(prev):], text
            trained = labels[start] != IGNORE
            out.append((GREEN + piece + RESET if color else f"[[{piece}]]") if trained else piece)
            start = k
    return "".join(out)


def examples(rows, n: int, seed: int):
    """The first ``n`` examples in epoch 0's order (packed rows split back into their examples)."""
    if n <= 0:
        return
    for i in epoch_order(len(rows), seed, 0):
        row, at = rows[i], 0
        for length in example_lengths(row):
            yield row["input_ids"][at:at + length], row["labels"][at:at + length]
            at += length
            n -= 1
            if n == 0:
                return


def describe(data: mixture.PreparedData, cfg, tokenizer, n: int, color: bool) -> list[str]:
    lines = list(data.report(cfg))
    for split in (data.train, data.eval):
        if split is None:
            continue
        lengths = [k for row in split.rows for k in example_lengths(row)] if split.packed_rows is not None else \
            [len(x) for x in split.rows["input_ids"]]
        pct = ", ".join(f"{k} {v:,}" for k, v in percentiles(lengths).items())
        frac = split.stats.label_tokens / max(split.stats.tokens, 1)
        lines.append(f"{split.name} example lengths (tokens): {pct}; {frac:.1%} of tokens carry loss")
        lines += histogram(lengths, cfg.data.max_seq_len)
    for k, (ids, labels) in enumerate(examples(data.train.rows, n, cfg.train.seed), 1):
        trained = sum(t != IGNORE for t in labels)
        lines += [f"--- example {k}: {len(ids)} tokens, {trained} trained "
                  f"({'green' if color else 'in [[...]]'}) ---", mark(tokenizer, ids, labels, color)]
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(prog="allora-data", description="Show what a config trains on; --save pre-tokenizes it.")
    p.add_argument("config", help="YAML config, as for allora-train")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.packing=bfd")
    p.add_argument("-n", "--examples", type=int, default=5, help="examples to print (default 5)")
    p.add_argument("--save", type=Path, default=None, help="write the tokenized (packed) data to this directory")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="mark trained tokens in colour (auto: when stdout is a terminal) or with [[...]]")
    return p.parse_args(argv)


@cli
def main(argv: list[str] | None = None) -> None:
    from allora_ds.modeling import load_tokenizer

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.examples < 0:
        raise UserError(f"-n: must be >= 0, got {args.examples}")
    cfg = load_config(args.config, args.overrides)
    if args.save and cfg.data.tokenized:
        raise UserError("--save: data.tokenized is set; the data is pre-tokenized already")
    if args.save:
        pretokenized.check_target(args.save)
    mixture.check_paths(cfg)
    tokenizer = load_tokenizer(cfg.model)
    data = mixture.prepare(cfg, tokenizer)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print("\n".join(describe(data, cfg, tokenizer, args.examples, color)), flush=True)
    if args.save:
        pretokenized.save(data, cfg, tokenizer, args.save)
        print(f"saved to {args.save}: train with data.tokenized={args.save}", flush=True)


if __name__ == "__main__":
    main()
