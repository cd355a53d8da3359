"""Seeded data for the demo family: a three-step arithmetic task with worked solutions.

Task (finetuning, dev, test), one chat turn:
    user:      Compute (7 + 5) * 3 - 4.
    assistant: 7 + 5 = 12. 12 * 3 = 36. 36 - 4 = 32. Answer: 32

Pretraining corpus (related but different distribution, plain text, no chat format): arithmetic facts in
several phrasings and one- to three-step worked chains in other formats, ending in "Result: N": the task's
chat format, its "Compute" wording and its "Answer:" are new to the model at finetuning.

    python models/demo/make_data.py --out models/demo/data      # writes train/dev/test.jsonl

Splits are disjoint (no expression appears in two splits) and fully determined by the seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPLITS = {"train": 400, "dev": 300, "test": 600}
SEED = 1234
TASK_STEPS = 3
OPS = ("+", "-", "*")
MAX_VALUE = 199  # every intermediate and final value stays in 0..MAX_VALUE


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _operand(rng: random.Random, x: int, op: str) -> int | None:
    """A right operand for `x op ?` that keeps the result in range, or None when there is none."""
    if op == "*":
        hi = min(9, MAX_VALUE // max(x, 1))
        return rng.randint(2, hi) if hi >= 2 and x >= 2 else None
    if op == "+":
        hi = min(30, MAX_VALUE - x)
        return rng.randint(1, hi) if hi >= 1 else None
    hi = min(30, x)
    return rng.randint(1, hi) if hi >= 1 else None


def chain(rng: random.Random, steps: int) -> tuple[int, list[tuple[str, int]]]:
    """(start, [(op, operand), ...]) evaluated left to right, all values in 0..MAX_VALUE."""
    while True:
        x = rng.randint(2, 20)
        start, ops = x, []
        for _ in range(steps):
            op = rng.choice(OPS)
            y = _operand(rng, x, op)
            if y is None:
                break
            ops.append((op, y))
            x = _apply(x, op, y)
        if len(ops) == steps:
            return start, ops


def expression(start: int, ops: list[tuple[str, int]]) -> str:
    """Left-to-right chain as an expression that standard precedence reads the same way."""
    expr, additive = str(start), False
    for op, y in ops:
        if op == "*" and additive:
            expr = f"({expr})"
        expr = f"{expr} {op} {y}"
        additive = op in "+-"
    return expr


def worked(start: int, ops: list[tuple[str, int]]) -> tuple[list[str], int]:
    """(["7 + 5 = 12", "12 * 3 = 36", ...], final value)."""
    x, lines = start, []
    for op, y in ops:
        z = _apply(x, op, y)
        lines.append(f"{x} {op} {y} = {z}")
        x = z
    return lines, x


def task_item(rng: random.Random, idx: str, steps: int = TASK_STEPS) -> dict:
    start, ops = chain(rng, steps)
    lines, answer = worked(start, ops)
    return {
        "id": idx,
        "prompt": f"Compute {expression(start, ops)}.",
        "solution": ". ".join(lines) + f". Answer: {answer}",
        "answer": str(answer),
    }


def task_splits(seed: int = SEED, sizes: dict[str, int] = SPLITS, steps: int = TASK_STEPS) -> dict[str, list[dict]]:
    """Disjoint train/dev/test splits of the task."""
    rng, seen, out = random.Random(seed), set(), {}
    for split, n in sizes.items():
        items = []
        while len(items) < n:
            item = task_item(rng, f"{split}-{len(items):04d}", steps)
            if item["prompt"] in seen:
                continue
            seen.add(item["prompt"])
            items.append(item)
        out[split] = items
    return out


_FACT_FORMS = (
    "{x} {op} {y} = {z}.",
    "What is {x} {op} {y}? It is {z}.",
    "{x} {op} {y} equals {z}.",
    "We have {x} {op} {y} = {z}.",
)
_CHAIN_FORMS = (
    ("Evaluate {e}.\n", "{s}. Result: {z}\n"),
    ("Work out {e}:\n", "{s}. Result: {z}\n"),
    ("Q: {e} = ?\n", "A: {s}. Result: {z}\n"),
)


def pretrain_doc(rng: random.Random, exclude: set[str]) -> str:
    """One short plain-text document: a fact or a 1-3 step worked chain (never a task expression)."""
    r = rng.random()
    if r < 0.45:
        x = rng.randint(0, MAX_VALUE)
        op = rng.choice(OPS)
        y = _operand(rng, x, op)
        if y is None:
            return ""
        return rng.choice(_FACT_FORMS).format(x=x, op=op, y=y, z=_apply(x, op, y)) + "\n"
    start, ops = chain(rng, 1 if r < 0.6 else 2 if r < 0.8 else 3)
    e = expression(start, ops)
    if f"Compute {e}." in exclude:
        return ""
    steps, z = worked(start, ops)
    q, a = rng.choice(_CHAIN_FORMS)
    return q.format(e=e) + a.format(s=". ".join(steps), z=z)


def pretrain_corpus(n_docs: int, seed: int = SEED + 1, exclude: set[str] = frozenset()) -> list[str]:
    rng = random.Random(seed)
    docs = []
    while len(docs) < n_docs:
        d = pretrain_doc(rng, exclude)
        if d:
            docs.append(d)
    return docs


def write_splits(out: Path, splits: dict[str, list[dict]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for it in items:
                f.write(json.dumps(it) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    write_splits(args.out, task_splits(args.seed))


if __name__ == "__main__":
    main()
