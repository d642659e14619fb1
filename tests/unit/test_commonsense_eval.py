"""allora-eval's protocol pieces: answer extraction, prompts, test-file loading, scoring, sharding,
and batched generation == one prompt at a time."""

import json

import pytest

from allora_ds.commonsense_eval import (
    TASKS, TestSet, extract_answer, format_table, load_test_sets, main, render_prompt, score, shard,
)
from allora_ds.commonsense_synth import SETS, make, write_synthetic
from allora_ds.data import ALPACA_PROMPT, ALPACA_PROMPT_INPUT, Formatter
from allora_ds.errors import UserError

LABELS = {t.name: t.labels for t in TASKS}

# (dataset, generation, extracted): the reference's rule is a case-sensitive search for the
# dataset's labels anywhere in the response, leftmost match first, "" when none.
EXTRACTION = [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "false. Some would say true", "false"),
    ("boolq", "It is untrue", "true"),  # a substring counts, as in the reference
    ("boolq", "The correct answer is True", ""),  # case-sensitive
    ("boolq", "yes", ""),
    ("boolq", "", ""),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "solution1 is better than solution2", "solution1"),
    ("piqa", "Solution2", ""),
    ("piqa", "solution 2", ""),
    ("piqa", "solution3", ""),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("social_i_qa", "answer5", "answer5"),  # the pattern allows 1..5 for every answerN set
    ("ARC-Challenge", "Answer2: the sun. the correct answer is answer4", "answer4"),
    ("ARC-Easy", "the correct answer is answer 1", ""),
    ("openbookqa", "answer6", ""),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "ending5 or ending2", "ending2"),
    ("winogrande", "the correct answer is option1", "option1"),
    ("winogrande", "option", ""),
    # the text after the last "### Response:" is what counts (a model may restart the template)
    ("winogrande", "option1\n\n### Instruction:\nx\n\n### Response:\nthe correct answer is option2", "option2"),
    ("boolq", "  \n the correct answer is false\n", "false"),
]


@pytest.mark.parametrize("dataset,generation,expected", EXTRACTION)
def test_extract_answer_follows_the_reference_rule(dataset, generation, expected):
    assert extract_answer(generation, LABELS[dataset]) == expected


def test_label_sets_are_the_references():
    assert LABELS == {
        "boolq": ("true", "false"), "piqa": ("solution1", "solution2"),
        "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
        "hellaswag": ("ending1", "ending2", "ending3", "ending4"), "winogrande": ("option1", "option2"),
        "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
        "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
        "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    }


ROW = {"instruction": "Please choose the correct answer to the question: Q?\n\nAnswer1: a Answer2: b\n\n"
                      "Answer format: answer1/answer2", "input": "", "output": "the correct answer is answer1",
       "answer": "answer1"}


def test_alpaca_prompt_is_the_training_template():
    assert render_prompt(ROW) == ALPACA_PROMPT.format(instruction=ROW["instruction"])
    with_input = {**ROW, "input": "context"}
    assert render_prompt(with_input) == ALPACA_PROMPT_INPUT.format(instruction=ROW["instruction"], input="context")


def test_llm_adapters_prompt_is_the_references_verbatim():
    pad = " " * 16
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                f"the request. \n\n{pad}### Instruction:\n{pad}{ROW['instruction']}\n\n{pad}### Response:\n{pad}")
    assert render_prompt(ROW, "llm-adapters") == expected
    assert render_prompt({**ROW, "input": "ignored by the reference"}, "llm-adapters") == expected


def test_eval_prompt_tokens_are_the_training_prompt_tokens(tiny_tokenizer):
    """What the model sees at test time is exactly the prompt part of what it was trained on."""
    from allora_ds.config import DataConfig

    fmt = Formatter(tiny_tokenizer, DataConfig(train="x", format="alpaca"), "synthetic")
    for i, row in enumerate(make(6, seed=0) + [{**ROW, "input": "some context"}]):
        ids, labels = fmt(row, i)
        n_prompt = labels.index(next(t for t in labels if t != -100))
        assert tiny_tokenizer(render_prompt(row)).input_ids == ids[:n_prompt]


# ---------------------------------------------------------------------------------------------
# test files


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def test_llm_adapters_layout_named_by_directory_in_the_papers_order(tmp_path):
    for name in ("openbookqa", "boolq", "hellaswag"):
        _write(tmp_path / "dataset" / name / "test.json", [{**ROW, "answer": {"boolq": "true", "hellaswag": "ending2"}
                                                             .get(name, "answer1")}] * 3)
    _write(tmp_path / "dataset" / "gsm8k" / "test.json", [{"instruction": "2+2?", "answer": 4.0}])
    sets = load_test_sets([str(tmp_path / "dataset")], limit=2)
    assert [s.name for s in sets] == ["boolq", "hellaswag", "openbookqa"]  # gsm8k skipped: not commonsense
    assert [len(s.rows) for s in sets] == [2, 2, 2]
    assert sets[0].task.labels == ("true", "false")


def test_files_aliases_jsonl_and_inferred_label_sets(tmp_path):
    siqa = _write(tmp_path / "siqa.json", [ROW])
    jl = tmp_path / "arc_easy.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [ROW, ROW]) + "\n")
    own = _write(tmp_path / "mine.json", [{**ROW, "answer": "option2"}])
    sets = load_test_sets([str(siqa), str(jl), str(own)])
    assert [(s.name, s.task.name) for s in sets] == [("siqa", "social_i_qa"), ("arc_easy", "ARC-Easy"), ("mine", "mine")]
    assert sets[2].task.labels == ("option1", "option2")  # from its answers


def test_synthetic_sets_load_with_their_formats(tmp_path):
    write_synthetic(tmp_path, n_train=9, n_test=5)
    sets = load_test_sets([str(tmp_path / "dataset")])
    assert sorted(s.name for s in sets) == sorted(SETS)
    assert {s.name: s.task.labels[0] for s in sets} == {"synth_truefalse": "true", "synth_solution": "solution1",
                                                         "synth_answer": "answer1"}
    train = json.loads((tmp_path / "commonsense_train.json").read_text())
    assert len(train) == 9 and set(train[0]) == {"instruction", "input", "output", "answer"}


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("", "is empty"),
    ('[{"instruction": "x", "answer": "true"},\n{"instruction": ]', "boolq.json:2: invalid JSON"),
    ('{"instruction": "x"}', "expected a JSON list of examples, got dict"),
    ("[]", "has no examples"),
    ('[{"instruction": "x", "output": "the correct answer is true"}]', "example 1 has no field 'answer'"),
    ('[{"question": "x", "answer": "true"}]', "example 1 has no field 'instruction'"),
    ('[{"instruction": "x", "answer": "true"}, {"instruction": 3, "answer": "true"}]',
     "example 2: field 'instruction' must be a string, got int"),
    ('[{"instruction": "x", "answer": "yes"}]', "example 1: answer 'yes' is not one of true/false"),
])
def test_bad_test_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "boolq.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_test_sets([str(path)])


def test_unknown_name_with_unknown_answers_and_duplicates_are_refused(tmp_path):
    odd = _write(tmp_path / "trivia.json", [{"instruction": "x", "answer": "Paris"}])
    with pytest.raises(UserError, match="'trivia' is not one of the eight .* fit no answer format"):
        load_test_sets([str(odd)])
    a = _write(tmp_path / "a" / "boolq" / "test.json", [{**ROW, "answer": "true"}])
    with pytest.raises(UserError, match="two test sets named 'boolq'"):
        load_test_sets([str(a), str(_write(tmp_path / "boolq.json", [{**ROW, "answer": "false"}]))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no commonsense test file"):
        load_test_sets([str(tmp_path / "empty")])


def test_cli_reports_bad_data_in_one_line_before_loading_a_model(tmp_path, capsys):
    bad = _write(tmp_path / "piqa.json", [{"instruction": "x", "answer": "solution3"}])
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "no-model"), "--data", str(bad), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --data: ") and "answer 'solution3' is not one of solution1/solution2" in err[0]
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "piqa.json"), "--output", "o",
              "--batch-size", "0"])
    assert capsys.readouterr().err.strip() == "error: --batch-size: must be a positive integer, got 0"


def test_missing_model_is_one_clear_error(tmp_path, capsys):
    data = _write(tmp_path / "boolq.json", [{**ROW, "answer": "true"}])
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "nowhere"), "--data", str(data), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model: " in err[0] and "is not a directory" in err[0], err


# ---------------------------------------------------------------------------------------------
# scoring


def test_score_counts_unparseable_answers_as_wrong_and_averages_per_dataset(tmp_path):
    sets = [TestSet("boolq", TASKS[0], tmp_path / "b.json", [{"answer": "true"}, {"answer": "false"}] * 2),
            TestSet("piqa", TASKS[1], tmp_path / "p.json", [{"answer": "solution1"}])]
    gens = {("boolq", 0): "the correct answer is true", ("boolq", 1): "the correct answer is true",
            ("boolq", 2): "I do not know", ("boolq", 3): "false", ("piqa", 0): "solution1"}
    results, preds = score(sets, gens)
    assert results["boolq"] == {"column": "BoolQ", "file": str(tmp_path / "b.json"), "examples": 4, "correct": 2,
                                "accuracy": 50.0, "unparsed": 1}
    assert results["piqa"]["accuracy"] == 100.0
    assert preds[2] == {"id": "boolq/2", "dataset": "boolq", "index": 2, "generation": "I do not know",
                        "prediction": "", "answer": "true", "correct": False}
    table = format_table(results)
    assert table.splitlines()[-1].split() == ["average", "of", "2", "75.00"]


def test_shards_partition_the_sorted_work_evenly():
    work = list(range(23))
    parts = [shard(work, r, 4) for r in range(4)]
    assert sorted(x for p in parts for x in p) == work
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard(work, 0, 1) == work


# ---------------------------------------------------------------------------------------------
# batched generation


@pytest.mark.slow  # needs the session's tiny model, pretrained first (about 45 s)
@pytest.mark.parametrize("num_beams", [1, 4])
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_model, num_beams):
    """Greedy and beam search: the same text whatever the batch and padding (fp32, CPU)."""
    import torch

    from allora_ds.inference import ModelSource, generate, load_model, load_tokenizer

    torch.manual_seed(0)
    src = ModelSource("merged", tiny_model)
    tok, model = load_tokenizer(src), load_model(src)
    rows = make(9, seed=3) + [{**ROW, "instruction": "Say it."}]
    prompts = sorted((tok(render_prompt(r)).input_ids for r in rows), key=len, reverse=True)
    assert len({len(p) for p in prompts}) >= 4  # batches really are padded
    one = generate(model, tok, prompts, 1, num_beams, 24)
    batched = generate(model, tok, prompts, 4, num_beams, 24)
    assert one == batched
    assert len(set(one)) > 1 and all(one)  # real, prompt-dependent continuations
