"""User mistakes give one clear line on stderr, exit code 2, no traceback, and touch no output."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from tests.helpers import ASSETS, BIN, run, train_cmd, write_config

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the trainer or its ranks run in child processes


def _digest(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _cases(tmp: Path, model: Path):
    """(id, config overrides or None, extra CLI args, expected message regex)."""
    notcausal = tmp / "bert"
    notcausal.mkdir()
    (notcausal / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    ds = json.loads((Path(__file__).parents[2] / "ds_configs" / "zero3_cpu.json").read_text())
    incomplete = tmp / "ckpt-incomplete"
    (incomplete / "ds").mkdir(parents=True)
    return [
        ("malformed-jsonl-line", {"data": {"train": _write(tmp / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')}},
         [], r"data.train: .*bad.jsonl:2: invalid JSON"),
        ("missing-field", {"data": {"train": _write(tmp / "nofield.jsonl", '{"instruction": "a", "answer": "b"}\n')}},
         [], r"format 'alpaca' needs field\(s\) 'output'"),
        ("empty-dataset", {"data": {"train": _write(tmp / "empty.jsonl", "")}}, [], r"data.train: .*empty.jsonl is empty"),
        ("missing-data-file", {"data": {"train": str(tmp / "nope.jsonl")}}, [], r"data.train: .*nope.jsonl does not exist"),
        ("unsupported-data-file", {"data": {"train": _write(tmp / "d.txt", "hello")}}, [], r"unsupported file type '.txt'"),
        ("unknown-config-key", None, ["train.learning_rate=1e-4"], r"unknown key train.learning_rate \(did you mean 'train.lr'\?\)"),
        ("bad-override-syntax", None, ["lr=1e-4"], r"override 'lr=1e-4': expected section.key=value"),
        ("bad-value-type", None, ["train.micro_batch_size=big"], r"train.micro_batch_size: expected an integer, got 'big'"),
        ("missing-model-path", {"model": {"path": str(tmp / "no-model")}}, [], r"model.path: .*no-model is not a directory"),
        ("not-a-causal-lm", {"model": {"path": str(notcausal)}}, [], r"model.path: .*BertModel.*not a causal language model"),
        ("missing-ds-config", {"train": {"deepspeed": str(tmp / "none.json")}}, [], r"train.deepspeed: cannot read .*none.json"),
        ("invalid-ds-json", {"train": {"deepspeed": _write(tmp / "broken.json", '{\n  "zero_optimization": {"stage": 3,}\n}')}},
         [], r"broken.json:2:\d+: invalid JSON"),
        ("ds-config-conflict", {"train": {"deepspeed": _write(tmp / "conflict.json", json.dumps({**ds, "train_micro_batch_size_per_gpu": 3}))}},
         [], r"train_micro_batch_size_per_gpu is 3 but train.micro_batch_size gives 4"),
        ("ds-config-scheduler", {"train": {"deepspeed": _write(tmp / "sched.json", json.dumps({**ds, "scheduler": {"type": "WarmupLR"}}))}},
         [], r"remove the \"scheduler\" section"),
        ("adapter-rank", None, ["adapter.rank=0"], r"override: adapter.rank: rank must be a positive integer, got 0"),
        ("target-matches-nothing", None, ["adapter.target_modules=q_proj,qkv"], r"adapter.target_modules: adapter target\(s\) 'qkv' match no module"),
        ("resume-missing", None, [f"train.resume={tmp / 'no-ckpt'}"], r"train.resume: checkpoint .*no-ckpt does not exist"),
        ("resume-incomplete", None, [f"train.resume={incomplete}"], r"train.resume: .*ckpt-incomplete is not a complete checkpoint"),
        ("sp-not-dividing-world", None, ["train.sequence_parallel_size=2"],
         r"train.sequence_parallel_size=2 does not divide the 1 ranks of this run"),
        ("sp-heads", None, ["train.sequence_parallel_size=3"], r"the model's 4 attention heads do not split over 3 ranks"),
        ("sp-eager", None, ["train.sequence_parallel_size=2", "model.attn_implementation=eager"],
         r"model.attn_implementation=eager: sequence parallelism wraps sdpa"),
        ("sp-packed-sdpa", None, ["train.sequence_parallel_size=2", "data.packing=greedy"],
         r"data.packing: packed rows with train.sequence_parallel_size > 1 need model.attn_implementation flash"),
        ("offload-without-checkpointing", None, ["model.activation_offload=true"],
         r"override: model.activation_offload: needs model.gradient_checkpointing=true"),
        *_data_cases(tmp, model),
    ]


def _chat(tmp: Path, name: str, *turns) -> dict:
    """A data section: one conversation (``turns``) in a chat file, no eval set."""
    return {"data": {"train": _write(tmp / name, json.dumps({"messages": list(turns)}) + "\n"), "format": "chat", "eval": None}}


def _data_cases(tmp: Path, model: Path):
    """The refusals of chat data, mixtures, pre-tokenized data and trackers."""
    from allora_ds.data_cli import main as allora_data

    user = {"role": "user", "content": "hi"}
    made = tmp / "tokenized-64"
    cfg = write_config(tmp / "made.yaml", model, tmp / "made-run", data={"max_seq_len": 64})
    allora_data([str(cfg), "-n", "0", "--save", str(made)])  # pre-tokenized at another max_seq_len
    return [
        ("chat-image-part", _chat(tmp, "image.jsonl", {"role": "user", "content": [{"type": "text", "text": "what?"},
                                                                                 {"type": "image_url", "image_url": {"url": "a.png"}}]},
                                  {"role": "assistant", "content": "a cat"}),
         [], r"image.jsonl: row 1: message 1, part 2 has type 'image_url': only text parts can be trained on"),
        ("chat-null-content", _chat(tmp, "null.jsonl", user, {"role": "assistant", "content": None}),
         [], r"null.jsonl: row 1: message 2 \(assistant\) has no 'content' \(null or missing\)"),
        ("chat-unknown-role", _chat(tmp, "role.jsonl", {"role": "narrator", "content": "once"}, user,
                                    {"role": "assistant", "content": "x"}),
         [], r"role.jsonl: row 1: message 1: unknown role 'narrator'"),
        ("mixture-missing-source", {"data": {"train": [{"path": str(tmp / "nofield.jsonl")}, {"path": str(tmp / "gone.jsonl")}]}},
         [], r"data.train\[1\]: .*gone.jsonl does not exist"),
        ("mixture-bad-row", {"data": {"train": [{"path": str(ASSETS / "demo_train.jsonl")}, {"path": _write(
            tmp / "badrow.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 5}\n')}]}},
         [], r"data.train\[1\]: .*badrow.jsonl: row 2: field 'output' must be a string, got int"),
        ("tokenized-mismatch", None, [f"data.tokenized={made}"],
         r"data.tokenized: .*tokenized-64 was made differently \(max_seq_len: 64 there, 96 here\)"),
        ("unknown-tracker", None, ["train.report_to=[wandb,neptune]"], r"train.report_to: 'neptune' is not one of tensorboard, wandb, mlflow"),
    ]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    out = tmp / "existing-run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 3, "loss": 1.0}\n')
    (out / "config.yaml").write_text("model: {path: earlier}\n")
    cases = {c[0]: c[1:] for c in _cases(tmp, tiny_model)}
    assert sorted(cases) == sorted(CASES)
    return tmp, out, cases, tiny_model


CASES = ["malformed-jsonl-line", "missing-field", "empty-dataset", "missing-data-file", "unsupported-data-file",
         "unknown-config-key", "bad-override-syntax", "bad-value-type", "missing-model-path", "not-a-causal-lm",
         "missing-ds-config", "invalid-ds-json", "ds-config-conflict", "ds-config-scheduler", "adapter-rank",
         "target-matches-nothing", "resume-missing", "resume-incomplete", "chat-image-part", "chat-null-content",
         "chat-unknown-role", "mixture-missing-source", "mixture-bad-row", "tokenized-mismatch", "unknown-tracker",
         "sp-not-dividing-world", "sp-heads", "sp-eager", "sp-packed-sdpa",
         "offload-without-checkpointing"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_line_exit_2_and_no_damage(setup, name, tmp_path):
    tmp, out, cases, model = setup
    sections, extra, message = cases[name]
    before = _digest(out)
    cfg = write_config(tmp_path / "cfg.yaml", model, out, **(sections or {}))
    proc = run(train_cmd(cfg, *extra, nprocs=0), check=False, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"[{name}] rc={proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, f"[{name}] traceback:\n{proc.stderr[-3000:]}"
    errors = [ln for ln in err if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err[-1], f"[{name}] expected one final error line, got:\n{proc.stderr[-2000:]}"
    assert re.search(message, errors[0]), f"[{name}] {errors[0]!r} does not match {message!r}"
    assert _digest(out) == before, f"[{name}] the existing output directory was modified"


def test_export_bad_input(setup, tmp_path):
    tmp, out, _, _ = setup
    cmd = [BIN / "python", "-m", "allora_ds.export"]
    cases = [
        ([ "--checkpoint", tmp / "none", "--output", tmp_path / "o", "--merged"], r"--checkpoint: .*none does not exist"),
        ([ "--checkpoint", tmp / "ckpt-incomplete", "--output", tmp_path / "o", "--adapter"], r"is incomplete"),
        ([ "--checkpoint", tmp / "ckpt-incomplete", "--output", tmp_path / "o"], r"nothing to do: pass --merged and/or --adapter"),
    ]
    for args, message in cases:
        proc = run(cmd + args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr[-500:]
        assert not (tmp_path / "o").exists()
