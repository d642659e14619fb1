"""Token ids through the data pipeline with Meta's real Llama-3 tokenizer, against Meta's own encoder.

The reference is the ``llama-models`` package: its tiktoken ``Tokenizer`` and the ``ChatFormat``
that Meta's inference code uses to render dialogs.
"""

import pytest

from allora_ds.config import ModelConfig
from allora_ds.data import IGNORE, collate, pack
from allora_ds.errors import UserError
from allora_ds.modeling import load_tokenizer
from tests.llama3 import BOS_ID, EOS_ID, EOT_ID, PAD_ID
from tests.unit.test_data import _encode

ALPACA = [{"instruction": "Name the category of the word.", "input": "apple", "output": "fruit"},
          {"instruction": "What is 2 plus 3?", "input": "", "output": "5"}]
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Sort 3 1 2"},
        {"role": "assistant", "content": "1 2 3"}, {"role": "user", "content": "Reverse it, please."},
        {"role": "assistant", "content": "3 2 1 — done."}]
TEXTS = ["Hello world", "  two spaces\n\nnew lines\tand a tab ", "Numbers 1234567 and 3.14159",
         "Ünïcödé – 日本語 🙂", "don't I'll we've THEY'RE", "x" * 300]


@pytest.fixture(scope="module")
def tok(llama3_dir):
    return load_tokenizer(ModelConfig(path=str(llama3_dir)))


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def _meta_encode(meta, text):
    return meta.encode(text, bos=False, eos=False)


def test_converted_tokenizer_encodes_like_metas(tok, meta):
    assert len(tok) == 128256 == meta.n_words
    assert tok("Hello world").input_ids == [BOS_ID, 9906, 1917]
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == _meta_encode(meta, text), text
        assert tok.decode(ids) == text
    for name, i in meta.special_tokens.items():
        assert tok.convert_tokens_to_ids(name) == i, name


def test_llama3_special_tokens_and_padding(tok):
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS_ID, EOS_ID)
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.pad_token_id == PAD_ID
    assert tok.padding_side == "right"


def test_alpaca_one_bos_prompt_masked_response_and_eos_labelled(tmp_path, tok, meta):
    from allora_ds.data import ALPACA_PROMPT, ALPACA_PROMPT_INPUT

    ds, _ = _encode(tmp_path, tok, ALPACA, format="alpaca")
    for row, ex in zip(ds, ALPACA):
        prompt = (ALPACA_PROMPT_INPUT if ex["input"] else ALPACA_PROMPT).format(**ex)
        p_ids, r_ids = [BOS_ID] + _meta_encode(meta, prompt), _meta_encode(meta, ex["output"]) + [EOS_ID]
        assert row["input_ids"] == p_ids + r_ids
        assert row["labels"] == [IGNORE] * len(p_ids) + r_ids
        assert row["input_ids"].count(BOS_ID) == 1


def test_chat_ids_are_metas_and_only_assistant_turns_with_eot_are_labelled(tmp_path, tok, meta):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat

    ds, _ = _encode(tmp_path, tok, [{"messages": CHAT}], format="chat")
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    fmt = ChatFormat(meta)
    reference = fmt.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"], stop_reason="end_of_turn")
                                          for m in CHAT]).tokens
    gen_prompt = fmt._encode_header("assistant")  # Meta's encoder ends with the next assistant header
    assert reference[-len(gen_prompt):] == gen_prompt
    assert ids == reference[: -len(gen_prompt)]
    expected = [IGNORE]  # <|begin_of_text|>
    for m in CHAT:
        body = _meta_encode(meta, m["content"]) + [EOT_ID]
        expected += [IGNORE] * len(fmt._encode_header(m["role"]))
        expected += body if m["role"] == "assistant" else [IGNORE] * len(body)
    assert labels == expected
    assert ids.count(BOS_ID) == 1 and labels.count(EOT_ID) == 2


def test_text_one_bos_and_eos_labelled(tmp_path, tok, meta):
    ds, _ = _encode(tmp_path, tok, [{"text": t} for t in TEXTS[:3]], format="text")
    for row, text in zip(ds, TEXTS):
        assert row["input_ids"] == [BOS_ID] + _meta_encode(meta, text) + [EOS_ID]
        assert row["labels"] == [IGNORE] + row["input_ids"][1:]


def test_packed_and_padded_batches(tmp_path, tok):
    ds, _ = _encode(tmp_path, tok, ALPACA * 4, format="alpaca", max_seq_len=128)
    rows = list(ds)
    batch = collate(rows[:2], tok.pad_token_id)
    n = [len(r["input_ids"]) for r in rows[:2]]
    assert n[0] != n[1]
    for b, k in enumerate(n):
        assert batch["input_ids"][b, k:].eq(PAD_ID).all() and batch["labels"][b, k:].eq(IGNORE).all()
    packed = list(pack(ds, 128))
    assert len(packed) < len(rows)
    for r in packed:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert [i for i, t in enumerate(r["input_ids"]) if t == BOS_ID] == starts, "one BOS per packed example"
        assert all(r["labels"][s] == IGNORE for s in starts)
    batch = collate(packed[:2], tok.pad_token_id)
    assert PAD_ID not in batch["labels"] and batch["labels"].eq(EOS_ID).sum() == sum(
        r["labels"].count(EOS_ID) for r in packed[:2])


def test_stop_tokens_are_what_each_format_learns_to_end_with(tok):
    from allora_ds.modeling import stop_token_ids

    assert stop_token_ids(tok, "chat") == [EOT_ID]
    assert stop_token_ids(tok, "alpaca") == stop_token_ids(tok, "text") == [EOS_ID]


def test_conversation_opening_with_an_assistant_turn_is_a_one_line_error(tmp_path, tok):
    rows = [{"messages": [{"role": "assistant", "content": "Hi, how can I help?"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]}]
    with pytest.raises(UserError, match=r"d.jsonl: row 1: the conversation starts with an assistant turn"):
        _encode(tmp_path, tok, rows, format="chat")
