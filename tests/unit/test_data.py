"""Prompt formatting, label masking, truncation, packing and batching."""

import json

import pytest
import torch

from allora_ds.config import DataConfig
from allora_ds.data import (
    IGNORE, check_fields, collate, epoch_order, load_records, rounds_per_epoch, pack, rank_micro_batch, tokenize,
)
from allora_ds.errors import UserError

ALPACA = [
    {"instruction": "Name the category of the word.", "input": "apple", "output": "fruit"},
    {"instruction": "What is 2 plus 3?", "input": "", "output": "5"},
]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort 3 1 2"},
                      {"role": "assistant", "content": "1 2 3"}, {"role": "user", "content": "Reverse it"},
                      {"role": "assistant", "content": "3 2 1"}]}]


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _encode(tmp_path, tok, rows, **cfg):
    p = _jsonl(tmp_path, rows)
    dc = DataConfig(train=str(p), **cfg)
    ds = load_records(str(p), "train", "data.train")
    spec = check_fields(ds, dc, "data.train", str(p))
    return tokenize(ds, tok, dc, str(p), spec)


def test_alpaca_labels_cover_exactly_the_response_and_eos(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    ds, stats = _encode(tmp_path, tok, ALPACA, format="alpaca")
    for row, ex in zip(ds, ALPACA):
        ids, labels = row["input_ids"], row["labels"]
        response = tok(ex["output"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        n = len(response)
        assert labels[-n:] == response and ids[-n:] == response
        assert all(t == IGNORE for t in labels[:-n]), "prompt tokens must carry no loss"
        assert ids[0] == tok.bos_token_id
        decoded_prompt = tok.decode(ids[: len(ids) - n], skip_special_tokens=True)
        assert "### Instruction:\n" + ex["instruction"] in decoded_prompt
        assert ("### Input:" in decoded_prompt) == bool(ex["input"])
    assert stats.label_tokens == sum(sum(t != IGNORE for t in r["labels"]) for r in ds)


def test_chat_labels_cover_only_assistant_turns(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    ds, _ = _encode(tmp_path, tok, CHAT, format="chat")
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    learned = tok.decode([t for t in labels if t != IGNORE])
    assert learned == "1 2 3<|eot_id|>3 2 1<|eot_id|>", learned
    full = tok.decode(ids)
    assert full.startswith("<|begin_of_text|><|start_header_id|>system") and "Reverse it" in full


def test_text_format_learns_every_token_but_the_first(tmp_path, tiny_tokenizer):
    ds, _ = _encode(tmp_path, tiny_tokenizer, [{"text": "the red fox"}], format="text")
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    assert labels[0] == IGNORE and labels[1:] == ids[1:] and ids[-1] == tiny_tokenizer.eos_token_id


def test_truncation_is_counted_and_promptonly_examples_dropped(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    prompt_len = len(tok("Below is an instruction that describes a task. Write a response that appropriately "
                         "completes the request.\n\n### Instruction:\nHi\n\n### Response:\n").input_ids)
    max_len = prompt_len + 4
    long = {"instruction": "Reverse the order of the words. " * 20, "input": "", "output": "x"}  # prompt too long
    short = {"instruction": "Hi", "input": "", "output": "apple banana cherry grape lemon mango " * 6}  # cut response
    fits = {"instruction": "Hi", "input": "", "output": "a"}
    ds, stats = _encode(tmp_path, tok, [long, short, fits], format="alpaca", max_seq_len=max_len)
    assert (stats.truncated, stats.dropped, stats.examples) == (2, 1, 2)
    assert [len(r["input_ids"]) for r in ds] == [max_len, len(tok("a", add_special_tokens=False).input_ids) + 1 + prompt_len]


def test_packing_keeps_examples_whole_and_restarts_positions(tmp_path, tiny_tokenizer):
    rows = ALPACA * 6
    ds, _ = _encode(tmp_path, tiny_tokenizer, rows, format="alpaca", max_seq_len=128)
    packed = pack(ds, 128)
    assert len(packed) < len(ds)
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(r["input_ids"]) for r in ds)
    lengths = [len(r["input_ids"]) for r in ds]
    for r in packed:
        assert len(r["input_ids"]) <= 128
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        for s in starts:
            assert r["labels"][s] == IGNORE, "an example's first token must not be predicted from the previous one"
        seg = [b - a for a, b in zip(starts, starts[1:] + [len(r["input_ids"])])]
        assert all(n in lengths for n in seg)


def test_collate_pads_right_with_masked_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [IGNORE]}]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    packed = collate([{"input_ids": [1, 2], "labels": [IGNORE, 2], "position_ids": [0, 1]},
                      {"input_ids": [3, 4, 5], "labels": [IGNORE, 4, 5], "position_ids": [0, 0, 1]}], pad_id=0)
    assert packed["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]] and "attention_mask" not in packed


@pytest.mark.slow  # needs the session's tiny model, pretrained first (about 45 s)
def test_packed_examples_do_not_attend_to_each_other(tiny_model):
    """The logits of an example are the same alone and packed after another one (no KV cache, as in training)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    a, b = [1, 40, 41, 42, 43], [1, 50, 51, 52]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
        packed = model(input_ids=torch.tensor([a + b]), position_ids=positions, use_cache=False).logits[0]
    assert torch.allclose(packed[len(a):], alone, atol=1e-5)


def test_data_order_is_a_function_of_seed_and_epoch_and_ranks_partition_it():
    assert epoch_order(50, 1, 0) == epoch_order(50, 1, 0) != epoch_order(50, 1, 1)
    order = epoch_order(50, 1, 0)
    rounds = rounds_per_epoch(50, micro=4, world=3)
    assert rounds == 4
    seen = [i for r in range(rounds) for k in range(3) for i in rank_micro_batch(order, r, 4, 3, k)]
    assert len(seen) == len(set(seen)) == 48


@pytest.mark.parametrize(
    "content, fmt, message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "alpaca", r"d.jsonl:2: invalid JSON"),
        ('{"instruction": "a", "output": "b"}\n[1, 2]\n', "alpaca", r"d.jsonl:2: expected a JSON object per line"),
        ('{"instruction": "a", "answer": "b"}\n', "alpaca", r"format 'alpaca' needs field\(s\) 'output'; found 'instruction', 'answer'"),
        ('{"prompt": "a"}\n', "chat", r"format 'chat' needs field\(s\) 'messages'"),
        ('', "alpaca", r"d.jsonl is empty"),
        ('{"instruction": "a", "output": 5}\n', "alpaca", r"d.jsonl: row 1: field 'output' must be a string, got int"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "chat", r"row 1: the conversation has no assistant turn"),
    ],
)
def test_bad_data_is_reported_with_file_and_line(tmp_path, tiny_tokenizer, content, fmt, message):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=message):
        dc = DataConfig(train=str(p), format=fmt)
        ds = load_records(str(p), "train", "data.train")
        tokenize(ds, tiny_tokenizer, dc, str(p), check_fields(ds, dc, "data.train", str(p)))


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"data.train: .*missing.jsonl does not exist"):
        load_records(str(tmp_path / "missing.jsonl"), "train", "data.train")


def test_eval_fraction_holds_out_a_seeded_split(tmp_path, tiny_tokenizer):
    from allora_ds.config import load_config
    from allora_ds.train import prepare_data

    p = _jsonl(tmp_path, [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(40)])
    cfg = load_config(None, ["model.path=x", f"data.train={p}", "data.eval_fraction=0.25", "train.seed=1"])
    train, ev = prepare_data(cfg, tiny_tokenizer, rank=0)
    assert (len(train), len(ev)) == (30, 10)
    train2, ev2 = prepare_data(cfg, tiny_tokenizer, rank=0)
    assert ev["input_ids"] == ev2["input_ids"] and not set(map(tuple, ev["input_ids"])) & set(map(tuple, train["input_ids"]))


def _per_token_loss(model, batch):
    """Cross-entropy of every position that has a label (HF's shift: position t predicts label t+1)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                                             ignore_index=IGNORE)
    return loss[labels[:, 1:] != IGNORE]


@pytest.mark.slow  # needs the session's tiny model, pretrained first (about 45 s)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_flattened_micro_batch_scores_every_example_as_if_alone(tiny_model, attn):
    """Packed rows flattened into one row (what flash attention gets) and packed rows kept apart
    (what sdpa/eager get): every example's per-token loss equals that of the example run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn).eval()
    examples = [[1, 40, 41, 42, 43], [1, 50, 51, 52], [1, 60, 61], [1, 70, 71, 72, 73, 74]]
    rows = [{"input_ids": e, "labels": [IGNORE] + e[1:]} for e in examples]
    packed = [{"input_ids": a["input_ids"] + b["input_ids"], "labels": a["labels"] + b["labels"],
               "position_ids": list(range(len(a["input_ids"]))) + list(range(len(b["input_ids"])))}
              for a, b in (rows[:2], rows[2:])]
    with torch.no_grad():
        alone = torch.cat([_per_token_loss(model, collate([r], pad_id=0)) for r in rows])
        flat = collate(packed, pad_id=0, flatten=True)
        assert flat["input_ids"].shape == (1, sum(map(len, examples)))
        assert flat["cu_seq_lens_q"].tolist() == [0, 5, 9, 12, 18] and flat["max_length_q"] == 6
        for batch in (flat, collate(packed, pad_id=0), collate(rows, pad_id=0, flatten=True)):
            got = _per_token_loss(model, batch)
            assert torch.allclose(got, alone, atol=1e-5), f"{attn}: {(got - alone).abs().max():.2e} from the examples alone"
