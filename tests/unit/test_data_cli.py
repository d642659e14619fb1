"""allora-data: the trainer's data path shown (report, lengths, marked examples), nothing written to
the run directory; --save and data.tokenized, refused when made another way."""

import copy
import json
import re

import pytest

from allora_ds import mixture
from allora_ds.config import load_config
from allora_ds.data_cli import main
from allora_ds.errors import UserError
from allora_ds.modeling import load_tokenizer

CHAT = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Sort 3 1 2"}]},
                     {"role": "assistant", "content": "1 2 3"}]}


@pytest.fixture
def setup(tmp_path, tiny_tokenizer):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok_dir)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT) + "\n")
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}) + "\n"
                              for i in range(20)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{path: {tok_dir}}}\n"
                   f"data:\n  format: chat\n  max_seq_len: 64\n  train:\n    - {{path: {chat}}}\n"
                   f"    - {{path: {alpaca}, format: alpaca, count: 6}}\n"
                   f"train: {{output_dir: {tmp_path / 'run'}, seed: 3}}\n")
    return tmp_path, cfg


def _run(capsys, *argv):
    main([str(a) for a in argv])
    return capsys.readouterr().out


def test_report_lengths_and_marked_examples_without_writing_the_run(setup, capsys):
    tmp, cfg = setup
    out = _run(capsys, cfg, "data.packing=bfd", "-n", "8")
    assert re.search(r"train data: 8 examples, [\d,]+ tokens \([\d,]+ with loss\); 0 truncated to 64 tokens", out), out
    assert re.search(r"data.train\[0\] .*chat.jsonl \(chat, all\): 2 examples in the mix of 2", out)
    assert re.search(r"data.train\[1\] .*alpaca.jsonl \(alpaca, count 6\): 6 examples in the mix of 20", out)
    assert re.search(r"train data packed \(bfd\): 8 examples into \d+ rows of 64 tokens, packing efficiency [\d.]+%", out)
    assert re.search(r"train example lengths \(tokens\): p50 \d+, p90 \d+, p99 \d+, max \d+; [\d.]+% of tokens carry loss", out)
    assert len(re.findall(r"^ +\d+-\d+ +\d+ #*$", out, re.M)) == 8, "a histogram of 8 ranges"
    assert out.count("--- example ") == 8
    assert out.count("[[1 2 3<|eot_id|>]]") == 2, "the assistant reply and its end of turn are marked as trained"
    assert "Sort 3 1 2" in out and "[[Sort" not in out and "\033[" not in out, "piped: brackets, no colour"
    assert not (tmp / "run").exists(), "allora-data writes nothing to train.output_dir"


def test_colour_marks_the_same_tokens(setup, capsys):
    _, cfg = setup
    out = _run(capsys, cfg, "-n", "8", "--color", "always")
    assert out.count("\033[32m1 2 3<|eot_id|>\033[0m") == 2 and "[[" not in out


def test_save_then_train_on_it_reads_the_same_rows(setup, capsys, tiny_tokenizer):
    tmp, cfg = setup
    out = _run(capsys, cfg, "data.packing=greedy", "--save", tmp / "tok-data")
    assert f"train with data.tokenized={tmp / 'tok-data'}" in out
    fresh = mixture.prepare(load_config(cfg, ["data.packing=greedy"]), tiny_tokenizer)
    saved_cfg = load_config(cfg, ["data.packing=greedy", f"data.tokenized={tmp / 'tok-data'}"])
    saved = mixture.prepare(saved_cfg, tiny_tokenizer)
    for k in ("input_ids", "labels", "position_ids", "n_labels"):
        assert saved.train.rows[k] == fresh.train.rows[k], k
    report = "\n".join(saved.report(saved_cfg))
    assert "pre-tokenized in" in report and "data.train[1]" in report
    # data.train may be left out: only the directory is read
    bare = load_config(None, [f"model.path={tmp / 'tok'}", "data.format=chat", "data.max_seq_len=64",
                              "data.packing=greedy", f"data.tokenized={tmp / 'tok-data'}"])
    assert mixture.prepare(bare, tiny_tokenizer).train.rows["input_ids"] == fresh.train.rows["input_ids"]
    with pytest.raises(SystemExit) as e:
        _run(capsys, cfg, "--save", tmp / "tok-data")
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(r"^error: --save: .*tok-data exists and is not an empty directory", err, re.M), err


@pytest.mark.parametrize("change, message", [
    (["data.max_seq_len=32"], r"max_seq_len: 64 there, 32 here"),
    (["data.packing=bfd"], r"packing: greedy there, bfd here"),
    (["data.train_on=last_assistant"], r"train_on: all_assistant there, last_assistant here"),
    (["data.format=sharegpt"], r"format: chat there, sharegpt here"),
    (["data.eval_fraction=0.1"], r"eval: eval_fraction 0 of train there, eval_fraction 0.1 of train here"),
    ("template", r"chat_template: template \w+ there, template \w+ here"),
    ("tokenizer", r"tokenizer: .* \(vocabulary \w+\) there, .* \(vocabulary \w+\) here"),
])
def test_pretokenized_data_made_another_way_is_refused_in_one_line(setup, capsys, tiny_tokenizer, llama3_dir, change,
                                                                    message):
    tmp, cfg = setup
    _run(capsys, cfg, "data.packing=greedy", "--save", tmp / "tok-data")
    overrides = ["data.packing=greedy", f"data.tokenized={tmp / 'tok-data'}"]
    tok = tiny_tokenizer
    if change == "template":
        tok = copy.deepcopy(tiny_tokenizer)
        tok.chat_template = tok.chat_template.replace("| trim", "")
    elif change == "tokenizer":
        tok = load_tokenizer(load_config(None, [f"model.path={llama3_dir}", "data.train=x"]).model)
        tok.chat_template = tiny_tokenizer.chat_template
    else:
        overrides += change
    with pytest.raises(UserError, match=r"^data.tokenized: .*tok-data was made differently \(.*" + message) as e:
        mixture.prepare(load_config(cfg, overrides), tok)
    assert "\n" not in str(e.value)


def test_a_directory_not_made_by_allora_data_is_named(tmp_path, tiny_tokenizer):
    cfg = load_config(None, ["model.path=x", f"data.tokenized={tmp_path}"])
    with pytest.raises(UserError, match=r"data.tokenized: .* is not a directory written by `allora-data CONFIG --save DIR`"):
        mixture.prepare(cfg, tiny_tokenizer)


def test_an_export_of_a_run_on_pretokenized_data_stops_on_the_ends_of_its_sources(setup, capsys, tiny_tokenizer):
    """data.tokenized without data.train: the formats are those of the sources in the manifest
    (chat and alpaca), not the top-level data.format alone."""
    from allora_ds.export import add_stop_tokens

    tmp, cfg = setup
    _run(capsys, cfg, "--save", tmp / "tok-data")
    run_config = load_config(None, [f"model.path={tmp / 'tok'}", "data.format=chat", "data.max_seq_len=64",
                                    f"data.tokenized={tmp / 'tok-data'}"]).to_dict()
    add_stop_tokens(tmp / "tok", run_config, {"eos_token_id": tiny_tokenizer.eos_token_id})
    gen = json.loads((tmp / "tok" / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == sorted(tiny_tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]))
