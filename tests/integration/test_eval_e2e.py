"""allora-eval end to end on the tiny model: a model finetuned on a synthetic commonsense-style
mixture scores well above chance; 2 ranks under the deepspeed launcher give the same predictions
as 1; a training checkpoint, its merged export and its PEFT adapter give the same generations;
a model that does not fit its base, or a wrong --model/--base, is one clear error line."""

import json

import pytest

from allora_ds.commonsense_eval import PREDICTIONS_FILE, RESULTS_FILE, main
from allora_ds.commonsense_synth import CHANCE, SETS, finetune_tiny, write_synthetic
from tests.helpers import deepspeed_cmd, run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # the trainer or its ranks run in child processes


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synth"), n_train=1500, n_test=40, seed=0)


@pytest.fixture(scope="module")
def finetuned(tiny_model, synth, tmp_path_factory):
    """ALLoRA adapters trained in process on the synthetic mixture, merged (allora_ds.commonsense_synth)."""
    out = tmp_path_factory.mktemp("ft") / "merged"
    finetune_tiny(tiny_model, synth / "commonsense_train.json", out)
    return out


@pytest.fixture(scope="module")
def one_rank(finetuned, synth, tmp_path_factory):
    """The protocol's defaults (4 beams, 32 new tokens) on one process."""
    out = tmp_path_factory.mktemp("eval1")
    main(["--model", str(finetuned), "--data", str(synth / "dataset"), "--output", str(out), "--overwrite"])
    return out


def _results(out):
    return json.loads((out / RESULTS_FILE).read_text())


def _predictions(out):
    return [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]


def test_finetuned_tiny_model_scores_above_chance(one_rank, tiny_model, synth, tmp_path, capsys):
    res = _results(one_rank)
    acc = {name: r["accuracy"] for name, r in res["datasets"].items()}
    chance = {name: 100 * CHANCE[name] for name in SETS}
    assert set(acc) == set(SETS) and res["examples"] == 3 * 40
    assert res["average"] >= sum(chance.values()) / 3 + 25, (acc, chance)
    assert all(acc[n] > chance[n] for n in SETS), (acc, chance)
    assert res["protocol"]["num_beams"] == 4 and res["protocol"]["max_new_tokens"] == 32
    assert res["examples_per_s"] > 0
    preds = _predictions(one_rank)
    assert len(preds) == 120 and all(p["correct"] == (p["prediction"] == p["answer"]) for p in preds)
    assert sum(p["correct"] for p in preds) == sum(r["correct"] for r in res["datasets"].values())
    # the base model, before finetuning, does not answer in the format at all
    main(["--model", str(tiny_model), "--data", str(synth / "dataset"), "--output", str(tmp_path / "base"),
          "--limit", "8", "--num-beams", "1"])
    assert _results(tmp_path / "base")["average"] <= 100 * min(CHANCE.values())
    assert "average of 3" in capsys.readouterr().out


def test_two_ranks_give_the_same_predictions_as_one(one_rank, finetuned, synth, tmp_path):
    out = tmp_path / "eval2"
    proc = run(deepspeed_cmd(["--module", "allora_ds.commonsense_eval", "--model", finetuned, "--data",
                              synth / "dataset", "--output", out, "--batch-size", "5"], nprocs=2), timeout=600)
    assert "on 2 rank(s)" in proc.stdout
    assert _predictions(out) == _predictions(one_rank)
    two, one = _results(out), _results(one_rank)
    assert two["datasets"] == one["datasets"] and two["world_size"] == 2 and one["world_size"] == 1


def _generations(out):
    return [(p["id"], p["generation"]) for p in _predictions(out)]


def test_checkpoint_merged_export_and_peft_adapter_agree(trained, synth, tmp_path):
    """The same weights three ways: the run's newest checkpoint merged in memory on its base, the
    merged export (transformers) and the PEFT adapter on the base (peft's merge)."""
    run_dir, _, _ = trained
    common = ["--data", str(synth / "dataset"), "--limit", "6", "--num-beams", "1", "--max-new-tokens", "12"]
    main(["--model", str(run_dir), "--output", str(tmp_path / "ckpt"), *common])
    main(["--model", str(run_dir / "export" / "merged"), "--output", str(tmp_path / "merged"), *common])
    main(["--model", str(run_dir / "export" / "adapter"), "--output", str(tmp_path / "peft"), *common])
    ckpt = _results(tmp_path / "ckpt")
    assert ckpt["kind"] == "checkpoint" and ckpt["model"].endswith("step-00000008")
    assert _results(tmp_path / "peft")["kind"] == "peft"
    assert _generations(tmp_path / "ckpt") == _generations(tmp_path / "merged") == _generations(tmp_path / "peft")


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A tiny model of another width: adapters trained on the 64-wide one do not fit it."""
    from allora_ds.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny32") / "model", hidden=32, pretrain_steps=0)


def _one_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_model_that_does_not_fit_its_base_is_one_clear_error(trained, other_base, synth, tmp_path, capsys):
    run_dir, _, _ = trained
    data = ["--data", str(synth / "dataset" / "synth_truefalse" / "test.json"), "--output", str(tmp_path / "o")]
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    msg = _one_error(capsys, ["--model", str(ckpt), "--base", str(other_base), *data])
    assert "is 64x" in msg and f"the base {other_base} has (32, " in msg and "trained on another base" in msg
    msg = _one_error(capsys, ["--model", str(run_dir / "export" / "adapter"), "--base", str(other_base), *data])
    assert "does not fit the base" in msg and "size mismatch" in msg
    msg = _one_error(capsys, ["--model", str(run_dir / "export" / "merged"), "--base", str(other_base), *data])
    assert "is a merged model, which needs no base" in msg
    msg = _one_error(capsys, ["--model", str(tmp_path), *data])
    assert "not a merged model, a PEFT adapter or a training checkpoint" in msg
    assert not (tmp_path / "o").exists()  # nothing written on an error


def test_existing_results_are_not_overwritten(finetuned, synth, one_rank, capsys):
    before = (one_rank / RESULTS_FILE).read_text()
    msg = _one_error(capsys, ["--model", str(finetuned), "--data", str(synth / "dataset"), "--output", str(one_rank)])
    assert "already has eval_results.json (pass --overwrite" in msg
    assert (one_rank / RESULTS_FILE).read_text() == before
