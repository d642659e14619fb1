"""Mixtures of sources (weights, counts, epochs; deterministic for the seed) and the packing strategies."""

import json
import random

import pytest

from allora_ds import mixture, packing
from allora_ds.config import load_config
from allora_ds.data import IGNORE
from allora_ds.errors import UserError


def _alpaca(tmp_path, name, n, tag):
    p = tmp_path / name
    p.write_text("".join(json.dumps({"instruction": f"{tag} task {i}", "input": "", "output": f"{tag} {i}"}) + "\n"
                         for i in range(n)))
    return p


def _cfg(*overrides):
    return load_config(None, ["model.path=x", "train.seed=7", *overrides])


def _sources(*items):
    return "data.train=[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in it.items()) + "}" for it in items) + "]"


def _texts(tok, rows):
    return [tok.decode([t for t in r["labels"] if t != IGNORE]) for r in rows]


def test_counts_and_epochs_take_what_they_say_and_the_report_counts_each_source(tmp_path, tiny_tokenizer):
    a, b, c = _alpaca(tmp_path, "a.jsonl", 12, "alpha"), _alpaca(tmp_path, "b.jsonl", 10, "beta"), \
        _alpaca(tmp_path, "c.jsonl", 8, "gamma")
    cfg = _cfg(_sources({"path": a}, {"path": b, "epochs": 2.5}, {"path": c, "count": 3}))
    data = mixture.prepare(cfg, tiny_tokenizer)
    texts = _texts(tiny_tokenizer, data.train.rows)
    assert len(texts) == 12 + 25 + 3
    beta = [t for t in texts if t.startswith("beta")]
    assert len(beta) == 25 and len(set(beta)) == 10, "two whole passes, then a sample of half"
    gamma = [t for t in texts if t.startswith("gamma")]
    assert len(gamma) == 3 == len(set(gamma))
    assert [(s.key, s.examples) for s in data.train.sources] == [("data.train[0]", 12), ("data.train[1]", 25),
                                                               ("data.train[2]", 3)]
    assert sum(s.tokens for s in data.train.sources) == data.train.stats.tokens == sum(len(r["input_ids"]) for r in data.train.rows)
    report = "\n".join(data.report(cfg))
    assert "data.train[1] " + str(b) + " (alpaca, epochs 2.5): 25 examples in the mix of 10" in report, report
    again = mixture.prepare(cfg, tiny_tokenizer)
    assert again.train.rows["input_ids"] == data.train.rows["input_ids"], "the mixture is a function of the seed"
    other = mixture.prepare(_cfg(_sources({"path": a}, {"path": b, "epochs": 2.5}, {"path": c, "count": 3}),
                                 "train.seed=8"), tiny_tokenizer)
    assert sorted(_texts(tiny_tokenizer, other.train.rows)) != sorted(texts), "another seed samples other examples"


def test_weights_interleave_at_their_ratios(tmp_path, tiny_tokenizer):
    import datasets

    a, b = _alpaca(tmp_path, "a.jsonl", 60, "alpha"), _alpaca(tmp_path, "b.jsonl", 60, "beta")
    for stopping in ("first_exhausted", "all_exhausted"):
        cfg = _cfg(_sources({"path": a, "weight": 3}, {"path": b, "weight": 1}), f"data.mixing={stopping}")
        data = mixture.prepare(cfg, tiny_tokenizer)
        n_a, n_b = (s.examples for s in data.train.sources)
        texts = _texts(tiny_tokenizer, data.train.rows)
        # datasets' interleave_datasets itself, on the sources' indices, gives the same sequence
        ids = [datasets.Dataset.from_dict({"t": [f"{tag} {i}" for i in range(60)]}) for tag in ("alpha", "beta")]
        ref = datasets.interleave_datasets(ids, probabilities=[0.75, 0.25], seed=7, stopping_strategy=stopping)["t"]
        assert [t.removesuffix("</s>").removesuffix(tiny_tokenizer.eos_token) for t in texts] == ref
        if stopping == "first_exhausted":
            assert n_a == 60 and 10 < n_b < 35, (n_a, n_b)
        else:
            assert n_b == 60 and n_a > 60 and set(texts) >= set(_texts(tiny_tokenizer, mixture.prepare(
                _cfg(f"data.train={a}"), tiny_tokenizer).train.rows))


def test_sources_of_different_formats_mix(tmp_path, tiny_tokenizer):
    a = _alpaca(tmp_path, "a.jsonl", 4, "alpha")
    sg = tmp_path / "sg.jsonl"
    sg.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"q {i}"},
                                                        {"from": "gpt", "value": f"answer {i}"}]}) + "\n" for i in range(3)))
    data = mixture.prepare(_cfg(_sources({"path": a}, {"path": sg, "format": "sharegpt"})), tiny_tokenizer)
    texts = _texts(tiny_tokenizer, data.train.rows)
    assert len(texts) == 7 and sum(t.startswith("answer") and t.endswith("<|eot_id|>") for t in texts) == 3


def test_eval_fraction_is_held_out_of_every_source(tmp_path, tiny_tokenizer):
    a, b = _alpaca(tmp_path, "a.jsonl", 20, "alpha"), _alpaca(tmp_path, "b.jsonl", 20, "beta")
    data = mixture.prepare(_cfg(_sources({"path": a}, {"path": b, "epochs": 2}), "data.eval_fraction=0.25"), tiny_tokenizer)
    train, ev = _texts(tiny_tokenizer, data.train.rows), _texts(tiny_tokenizer, data.eval.rows)
    assert len(ev) == 10 and not set(ev) & set(train), "no held-out example is trained on"
    assert len(train) == 15 + 30


@pytest.mark.parametrize("items, message", [
    ([{"path": "GOOD"}, {"path": "./missing.jsonl"}], r"data.train\[1\]: ./missing.jsonl does not exist"),
    ([{"path": "GOOD"}, {"path": "BAD"}], r"data.train\[1\]: .*bad.jsonl: row 2: field 'output' must be a string, got int"),
    ([{"path": "GOOD"}, {"path": "NOFIELD"}], r"data.train\[1\]: .*nofield.jsonl: format 'alpaca' needs field\(s\) 'output'"),
])
def test_bad_sources_are_named_by_index_and_path(tmp_path, tiny_tokenizer, items, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _alpaca(tmp_path, "good.jsonl", 3, "alpha")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n')
    (tmp_path / "nofield.jsonl").write_text('{"instruction": "a", "answer": "b"}\n')
    paths = {"GOOD": good, "BAD": tmp_path / "bad.jsonl", "NOFIELD": tmp_path / "nofield.jsonl"}
    cfg = _cfg(_sources(*[{"path": paths.get(it["path"], it["path"])} for it in items]))
    with pytest.raises(UserError, match=message):
        mixture.check_paths(cfg)
        mixture.prepare(cfg, tiny_tokenizer)


def test_bfd_packs_into_fewer_rows_than_greedy_where_order_wastes_space():
    lengths = [6, 5, 4, 3, 2]
    assert packing.greedy_bins(lengths, 10) == [[0], [1, 2], [3, 4]]
    assert sorted(map(sorted, packing.bfd_bins(lengths, 10))) == [[0, 2], [1, 3, 4]]


def test_greedy_keeps_the_rows_of_earlier_releases():
    """Greedy packing started a new row every 1,000 examples (one datasets.map batch); it still does."""
    assert [len(b) for b in packing.greedy_bins([1] * 1001, 5000)] == [1000, 1]


def test_both_strategies_place_every_example_once_within_max_len():
    rng = random.Random(0)
    for trial in range(20):
        max_len = rng.choice([16, 64, 512])
        lengths = [rng.randint(1, max_len) for _ in range(rng.randint(1, 300))]
        rows = {name: fn(lengths, max_len) for name, fn in packing.STRATEGIES.items()}
        for name, bins in rows.items():
            assert sorted(i for b in bins for i in b) == list(range(len(lengths))), name
            assert all(sum(lengths[i] for i in b) <= max_len for b in bins), name
        lower = -(-sum(lengths) // max_len)
        assert lower <= len(rows["bfd"]) <= len(rows["greedy"]), trial


@pytest.mark.parametrize("strategy", ["greedy", "bfd"])
def test_packed_rows_keep_examples_whole_and_report_efficiency(tmp_path, tiny_tokenizer, strategy):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"instruction": "Repeat. " * (i % 7 + 1), "input": "", "output": "word " * (i % 5 + 1)})
                         + "\n" for i in range(40)))
    plain = mixture.prepare(_cfg(f"data.train={p}", "data.max_seq_len=128"), tiny_tokenizer).train.rows
    cfg = _cfg(f"data.train={p}", "data.max_seq_len=128", f"data.packing={strategy}")
    data = mixture.prepare(cfg, tiny_tokenizer)
    rows = list(data.train.rows)
    examples = []
    for r in rows:
        assert len(r["input_ids"]) <= 128
        starts = [i for i, q in enumerate(r["position_ids"]) if q == 0] + [len(r["input_ids"])]
        for s, e in zip(starts, starts[1:]):
            assert r["position_ids"][s:e] == list(range(e - s)) and r["labels"][s] == IGNORE
            examples.append((tuple(r["input_ids"][s:e]), tuple(r["labels"][s:e])))
        assert r["n_labels"] == sum(t != IGNORE for t in r["labels"])
    assert sorted(examples) == sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in plain)
    eff = sum(len(r["input_ids"]) for r in rows) / (len(rows) * 128)
    assert f"into {len(rows)} rows of 128 tokens, packing efficiency {eff:.1%}" in "\n".join(data.report(cfg))
    assert mixture.prepare(cfg, tiny_tokenizer).train.rows["input_ids"] == data.train.rows["input_ids"]
