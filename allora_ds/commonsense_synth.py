"""Synthetic commonsense-style data in the LLM-Adapters layout, for the tiny model and the tests.

    python -m allora_ds.commonsense_synth OUT_DIR [--train 2000 --test 60 --seed 0] [--finetune TINY_MODEL_DIR]

writes ``OUT_DIR/commonsense_train.json`` (instruction, input, output, answer: the fields of
commonsense_170k.json) and ``OUT_DIR/dataset/NAME/test.json`` for three sets whose answers follow
the real benchmarks' formats: ``synth_truefalse`` (BoolQ's true/false), ``synth_solution`` (PIQA's
solution1/2) and ``synth_answer`` (ARC/OBQA's answer1..4). The right answer follows from the category
the question names ("where would you find a fruit?" -> "in an orchard"). Test questions are drawn
like the training ones, so they repeat training prompts: the sets check an evaluation pipeline
(prompt, decoding, extraction, scoring), not generalisation. A model that ignores the question
scores at chance (50%, 50% and 25%); one that does not follow the answer format scores 0.

``--finetune`` trains ALLoRA adapters on the training file in one process (a plain torch loop, like
``allora_ds.tiny``'s pretraining) and writes the merged model to ``OUT_DIR/finetuned``: the tiny
model for allora-eval's tests and its example in docs/eval.md, in a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SETS = ("synth_truefalse", "synth_solution", "synth_answer")
CHANCE = {"synth_truefalse": 0.5, "synth_solution": 0.5, "synth_answer": 0.25}
# (question, options, {category of the question: index of the right option}); options in fixed order.
QUESTIONS = {
    "synth_truefalse": ("can {a} {cat} walk?", ("true", "false"), {"animal": 0, "tool": 1}),
    "synth_solution": ("where do you keep {a} {cat}?", ("in a fruit bowl", "in a toolbox"), {"fruit": 0, "tool": 1}),
    "synth_answer": ("where would you find {a} {cat}?", ("in an orchard", "in a zoo", "on a palette", "in a toolbox"),
                     {"fruit": 0, "animal": 1, "color": 2, "tool": 3}),
}


def example(kind: str, rng: random.Random) -> dict:
    """One example of ``kind`` in LLM-Adapters' phrasing (``... Answer format: a/b``) and fields."""
    question, options, right = QUESTIONS[kind]
    cat = rng.choice(sorted(right))
    k = right[cat]
    q = question.format(a="an" if cat[0] in "aeiou" else "a", cat=cat)
    if kind == "synth_truefalse":
        answer = options[k]
        instruction = f"Please answer the following question with true or false, question: {q}\n\nAnswer format: true/false"
    else:
        stem = "solution" if kind == "synth_solution" else "answer"
        sep = "\n\n" if stem == "solution" else " "  # PIQA lists solutions on lines, ARC answers inline
        listed = sep.join(f"{stem.capitalize()}{i + 1}: {o}" for i, o in enumerate(options))
        fmt = "/".join(f"{stem}{i + 1}" for i in range(len(options)))
        instruction = f"Please choose the correct {stem} to the question: {q}\n\n{listed}\n\nAnswer format: {fmt}"
        answer = f"{stem}{k + 1}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def make(n: int, seed: int, kinds: tuple[str, ...] = SETS) -> list[dict]:
    rng = random.Random(seed)
    return [example(kinds[i % len(kinds)], rng) for i in range(n)]


def write_synthetic(out_dir: str | Path, n_train: int = 2000, n_test: int = 60, seed: int = 0) -> Path:
    """Write the training mixture and one test file per set; returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "commonsense_train.json").write_text(json.dumps(make(n_train, seed), indent=1))
    for j, kind in enumerate(SETS):
        d = out / "dataset" / kind
        d.mkdir(parents=True, exist_ok=True)
        (d / "test.json").write_text(json.dumps(make(n_test, seed + 1000 + j, (kind,)), indent=1))
    return out


def finetune_tiny(model_dir: str | Path, train_file: str | Path, out_dir: str | Path, steps: int = 260,
                  batch: int = 8, lr: float = 1e-2, seed: int = 0) -> float:
    """ALLoRA adapters on a tiny model, trained on an alpaca-format file with the trainer's own pieces
    (``Formatter``, ``collate``, ``inject_adapters``), merged with ``merged_weight`` and saved in Hugging
    Face format to ``out_dir``. Returns the last step's loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from allora_ds.adapters import LLAMA_TARGETS, AdapterSpec, adapter_modules, inject_adapters, merged_weight
    from allora_ds.config import DataConfig
    from allora_ds.data import Formatter, collate

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # The tiny base never saw "answer", "solution" or EOS as targets in pretraining; an adapter on its
    # frozen LM head lets it learn to write them in a few hundred steps (a real 8B model needs none).
    spec = AdapterSpec(method="allora", rank=8, eta=2.0, target_modules=LLAMA_TARGETS + ("lm_head",))
    inject_adapters(model, spec, seed=seed, verbose=False)
    fmt = Formatter(tok, DataConfig(train=str(train_file), format="alpaca"), str(train_file))
    rows = json.loads(Path(train_file).read_text())
    examples = [dict(zip(("input_ids", "labels"), fmt(r, i))) for i, r in enumerate(rows)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        loss = model(**collate(rng.sample(examples, batch), tok.pad_token_id)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        for name, layer in adapter_modules(model).items():
            base = layer.base_layer
            base.weight.copy_(merged_weight(base.weight, layer.lora_A, layer.lora_B, layer.spec.scale))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, base)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return loss.item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=2000, help="training examples (the three kinds in turn)")
    p.add_argument("--test", type=int, default=60, help="test examples per set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune", metavar="TINY_MODEL_DIR", help="then finetune this model into OUT_DIR/finetuned")
    p.add_argument("--steps", type=int, default=260, help="finetuning steps (batch 8)")
    a = p.parse_args(argv)
    out = write_synthetic(a.out_dir, a.train, a.test, a.seed)
    print(f"wrote {out / 'commonsense_train.json'} and {', '.join(f'{out}/dataset/{s}/test.json' for s in SETS)}")
    if a.finetune:
        loss = finetune_tiny(a.finetune, out / "commonsense_train.json", out / "finetuned", steps=a.steps, seed=a.seed)
        print(f"finetuned {a.finetune} for {a.steps} steps (last loss {loss:.4f}): {out / 'finetuned'}")


if __name__ == "__main__":
    main()
