"""Meta's real Llama-3 tokenizer end to end: 2-rank ZeRO-3 runs on chat (packed), alpaca and text
(packed) data, export, and loading in transformers and PEFT.

The token ids themselves are checked against Meta's encoder in tests/unit/test_llama3_tokens.py;
here the same pipeline drives real runs, and the exports must load, agree with each other and
stop generating where the finetune taught the model to stop.
"""

import json

import pytest
import torch

from tests.helpers import ASSETS, read_metrics, run, train_cmd, write_config
from tests.llama3 import EOS_ID, EOT_ID

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the trainer or its ranks run in child processes

STEPS = 2
CONVERSATION = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Sort the numbers from smallest to largest.\n9 4 7"}]


def _rows(path, n):
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def runs(llama3_dir, tmp_path_factory):
    """Three short runs on the real-tokenizer model: {name: run_dir}."""
    d = tmp_path_factory.mktemp("llama3")
    corpus = [ln for ln in (ASSETS / "corpus.txt").read_text().splitlines() if ln.strip()][:64]
    data = {
        "chat": _jsonl(d / "chat.jsonl", _rows(ASSETS / "demo_chat.jsonl", 32)),
        "alpaca": _jsonl(d / "alpaca.jsonl", _rows(ASSETS / "demo_train.jsonl", 32)),
        "text": _jsonl(d / "text.jsonl", [{"text": t} for t in corpus]),
    }
    plan = {"chat": {"packing": True, "export": {"merged": True, "adapter": True}},
            "alpaca": {"packing": False, "export": {"merged": True}},
            "text": {"packing": True, "export": {}}}
    out = {}
    for name, p in plan.items():
        cfg = write_config(d / f"{name}.yaml", llama3_dir, d / name,
                           data={"train": str(data[name]), "eval": None, "format": name, "packing": p["packing"],
                                 "max_seq_len": 128},
                           train={"micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": STEPS,
                                  "warmup_steps": 0, "save_steps": 0},
                           export=p["export"])
        run(train_cmd(cfg))
        out[name] = d / name
    return out


def test_every_format_trains_under_zero3(runs):
    for name, run_dir in runs.items():
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), name
        assert all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in rows), name


def test_chat_export_stops_on_eot_and_alpaca_export_on_eos(runs, llama3_dir):
    from transformers import GenerationConfig

    base = json.loads((llama3_dir / "generation_config.json").read_text())
    assert base["eos_token_id"] == EOS_ID  # a base model: it would not stop after a chat reply
    chat = json.loads((runs["chat"] / "export" / "merged" / "generation_config.json").read_text())
    assert chat["eos_token_id"] == [EOS_ID, EOT_ID]
    assert {k: v for k, v in chat.items() if k != "eos_token_id"} == {k: v for k, v in base.items() if k != "eos_token_id"}
    assert GenerationConfig.from_pretrained(runs["chat"] / "export" / "merged").eos_token_id == [EOS_ID, EOT_ID]
    alpaca = json.loads((runs["alpaca"] / "export" / "merged" / "generation_config.json").read_text())
    assert alpaca == base


def test_chat_export_loads_in_transformers_and_peft_and_they_agree(runs, llama3_dir):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = runs["chat"] / "export" / "merged"
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    meta = ChatFormat(Tokenizer.get_instance()).encode_dialog_prompt([RawMessage(**m) for m in CONVERSATION]).tokens
    assert ids == meta, "the exported tokenizer's chat template renders a prompt other than Meta's"
    inputs = torch.tensor([ids])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(llama3_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=inputs).logits
        peft = PeftModel.from_pretrained(base, runs["chat"] / "export" / "adapter").eval()
        got_merged, got_peft = merged(input_ids=inputs).logits, peft(input_ids=inputs).logits
    err = (got_merged - got_peft).abs().max().item()
    assert err <= 1e-4, f"merged and base+PEFT logits differ by {err:.2e}"
    assert (got_merged - base_logits).abs().max() > 1e-4, "the adapters changed nothing: the test proves little"
