"""The embedded demo's text: a tokenizer corpus and small instruction sets, generated.

Everything is synthetic: sentences from a fixed grammar over short word lists, and
instruction/response pairs for tasks whose answers a program can check (reverse a list of
words, sort numbers, add, name an item's category). ``python -m allora_ds.demo_data``
regenerates the files shipped in ``allora_ds/assets/`` byte for byte (a test checks it).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum", "pear", "orange"],
    "animal": ["cat", "dog", "horse", "mouse", "tiger", "rabbit", "eagle", "whale", "sheep", "goat"],
    "color": ["red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "gray"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "ladder", "rope", "knife", "brush", "needle"],
    "place": ["river", "forest", "village", "mountain", "harbor", "market", "garden", "castle", "bridge", "valley"],
}
WORDS = [w for ws in CATEGORIES.values() for w in ws]
VERBS = ["sees", "finds", "carries", "paints", "follows", "watches", "likes", "guards", "visits", "remembers"]
ADJECTIVES = ["small", "old", "quiet", "bright", "heavy", "quick", "gentle", "strange", "tall", "warm"]


def _sentence(rng: random.Random) -> str:
    a, b = rng.choice(WORDS), rng.choice(WORDS)
    adj, verb = rng.choice(ADJECTIVES), rng.choice(VERBS)
    forms = [
        f"The {adj} {a} {verb} the {b}.",
        f"A {a} {verb} a {adj} {b} near the {rng.choice(CATEGORIES['place'])}.",
        f"Every morning the {a} {verb} {rng.randint(2, 99)} {b}s.",
        f"Is the {a} {adj}? Yes, and the {b} is {rng.choice(ADJECTIVES)} too.",
        f"We counted {rng.randint(2, 99)} and then {rng.randint(2, 99)} {a}s by the {b}.",
    ]
    return rng.choice(forms)


def corpus(n_lines: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(_sentence(rng) for _ in range(n_lines)) + "\n"


def _task(rng: random.Random) -> dict:
    kind = rng.randrange(4)
    if kind == 0:
        words = rng.sample(WORDS, rng.randint(3, 5))
        return {"instruction": "Reverse the order of the words.", "input": " ".join(words),
                "output": " ".join(reversed(words))}
    if kind == 1:
        nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
        return {"instruction": "Sort the numbers from smallest to largest.", "input": " ".join(map(str, nums)),
                "output": " ".join(map(str, sorted(nums)))}
    if kind == 2:
        a, b = rng.randint(0, 50), rng.randint(0, 49)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
    cat = rng.choice(list(CATEGORIES))
    return {"instruction": "Name the category of the word.", "input": rng.choice(CATEGORIES[cat]), "output": cat}


def instructions(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [_task(rng) for _ in range(n)]


def chat_examples(n: int, seed: int) -> list[dict]:
    """The same tasks as chat conversations (``messages`` with system/user/assistant turns)."""
    out = []
    for ex in instructions(n, seed):
        user = ex["instruction"] + (f"\n{ex['input']}" if ex["input"] else "")
        out.append({"messages": [{"role": "system", "content": "You answer briefly."},
                                 {"role": "user", "content": user},
                                 {"role": "assistant", "content": ex["output"]}]})
    return out


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def asset_texts() -> dict[str, str]:
    """File name -> content of every generated asset."""
    return {
        "corpus.txt": corpus(),
        "demo_train.jsonl": _jsonl(instructions(480, seed=1)),
        "demo_eval.jsonl": _jsonl(instructions(48, seed=2)),
        "demo_chat.jsonl": _jsonl(chat_examples(64, seed=3)),
    }


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:] or [str(ASSETS)])[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in asset_texts().items():
        (out / name).write_text(text, encoding="utf-8")
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
