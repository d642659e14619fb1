"""Pre-tokenized data: ``allora-data CONFIG --save DIR`` tokenizes (and packs) once, on any machine;
``data.tokenized: DIR`` trains on it without a tokenizer pass.

    DIR/train/, DIR/eval/      the rows, as ``datasets.Dataset.save_to_disk`` writes them
    DIR/allora_data.json       how they were made (provenance) and the data report's numbers

Training refuses a directory made with another tokenizer, chat template, format (or sources),
max_seq_len, packing or choice of trained turns, in one line that names what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from allora_ds.config import Config, DataSource
from allora_ds.data import DataStats
from allora_ds.errors import UserError
from allora_ds.mixture import PreparedData, SourceReport, SplitData

MANIFEST = "allora_data.json"
VERSION = 1


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """The vocabulary, the special tokens and their ids: what decides the ids of any text."""
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    added = {i: str(t) for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    return _sha(json.dumps([sorted(tokenizer.get_vocab().items()), special, added, type(tokenizer).__name__,
                            tokenizer.bos_token_id, tokenizer.eos_token_id]))


def provenance(cfg: Config, tokenizer) -> dict:
    d = cfg.data
    sources = [dataclasses.asdict(s) for s in d.sources("train")]
    held_out = {"eval": [dataclasses.asdict(s) for s in d.sources("eval")]} if d.eval is not None else \
        {"eval_fraction": d.eval_fraction}
    return {"tokenizer": tokenizer_fingerprint(tokenizer), "tokenizer_name": str(tokenizer.name_or_path),
            "chat_template": _sha(json.dumps(tokenizer.chat_template)), "format": d.format, "sources": sources,
            "max_seq_len": d.max_seq_len, "packing": d.packing_strategy, "train_on": d.train_on, "eval": held_out}


def save(data: PreparedData, cfg: Config, tokenizer, out: Path) -> None:
    """Write ``data`` to ``out`` whole or not at all (a temporary directory renamed at the end)."""
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        splits = {}
        for split in (data.train, data.eval):
            if split is not None:
                split.rows.save_to_disk(str(tmp / split.name), num_proc=None)
                splits[split.name] = {"stats": dataclasses.asdict(split.stats), "packed_rows": split.packed_rows,
                                      "sources": [dataclasses.asdict(s) for s in split.sources]}
        manifest = {"version": VERSION, "provenance": provenance(cfg, tokenizer), "splits": splits}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--save: {out} exists and is not an empty directory; remove it or name another one")


def read_manifest(path: str) -> dict:
    p = Path(path).expanduser()
    try:
        return json.loads((p / MANIFEST).read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"data.tokenized: {path} is not a directory written by `allora-data CONFIG --save DIR` "
                        f"(no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"data.tokenized: {p / MANIFEST}: invalid JSON ({e.msg})") from None


def check(saved: dict, cfg: Config, tokenizer, path: str) -> None:
    """One line naming everything that differs between how ``path`` was made and this run."""
    now = provenance(cfg, tokenizer)
    keys = ["tokenizer", "chat_template", "format", "max_seq_len", "packing", "train_on"]
    if cfg.data.train is not None:  # without data.train the config does not say what the data is
        keys.insert(3, "sources")
        if "eval" in saved:  # written since the eval data is recorded
            keys.insert(4, "eval")

    def listed(sources):
        return ", ".join(f"{s['path']} ({s['format']}, {DataSource(**s).how_many()})" for s in sources)

    shown = {"tokenizer": lambda p: f"{p['tokenizer_name']} (vocabulary {p['tokenizer']})",
             "chat_template": lambda p: f"template {p['chat_template']}",
             "sources": lambda p: listed(p["sources"]),
             "eval": lambda p: f"eval data {listed(p['eval']['eval'])}" if "eval" in p["eval"] else
             f"eval_fraction {p['eval']['eval_fraction']:g} of train"}
    diff = [f"{k}: {shown.get(k, lambda p: p[k])(saved)!s} there, {shown.get(k, lambda p: p[k])(now)!s} here"
            for k in keys if saved.get(k) != now[k]]
    if diff:
        raise UserError(f"data.tokenized: {path} was made differently ({'; '.join(diff)}); run "
                        f"`allora-data CONFIG --save DIR` again with this config")


def source_formats(path: str) -> list[str]:
    """The formats of the training sources tokenized into ``path`` ([] when it cannot be read)."""
    try:
        sources = read_manifest(path)["provenance"]["sources"]
    except (UserError, KeyError, TypeError):
        return []
    return list(dict.fromkeys(s["format"] for s in sources))


def load(cfg: Config, tokenizer) -> PreparedData:
    import datasets

    path = cfg.data.tokenized
    manifest = read_manifest(path)
    check(manifest["provenance"], cfg, tokenizer, path)
    splits = {}
    for name, info in manifest["splits"].items():
        rows = datasets.load_from_disk(str(Path(path).expanduser() / name))
        sources = [SourceReport(s["key"], DataSource(**s["spec"]), DataStats(**s["stats"]), s["examples"], s["tokens"],
                                s["label_tokens"]) for s in info["sources"]]
        splits[name] = SplitData(name, rows, DataStats(**info["stats"]), sources, info["packed_rows"],
                                 origin=f" (pre-tokenized in {path})")
    return PreparedData(splits["train"], splits.get("eval"))
