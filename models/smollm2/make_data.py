"""Seeded task data for the SmolLM2 family: three short task types, graded by exact match.

In the spirit of the paper's law / math / logic groups, each item is one chat turn whose answer is a short
string (graded with `--extract exact`):

    logic  "Sort alphabetically: pear, lion, apple, desk"                          -> "apple, desk, lion, pear"
    law    "Rule: a book is free for 14 days, then 3 dollars per extra day.
            Returned after 20 days. Late fee in dollars?"                          -> "18"
    math   "Next number: 4, 11, 18, 25, ?"                                          -> "32"

Prompts are short on purpose: training and scoring cost grows with every token on 2 CPU cores.

    python models/smollm2/make_data.py --splits models/smollm2/data        # the shipped train/dev/test
    python models/smollm2/make_data.py --seed 7 --n 600 --out draw7.jsonl   # a fresh draw from any seed

A fresh draw never contains an item of the shipped train split (so held-out checks on other seeds stay
held out). Splits are disjoint (no prompt in two splits) and fully determined by the seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS = {"train": 400, "dev": 300, "test": 600}
SEED = 2025
TYPES = ("logic", "law", "math")

# 120 common, lower-case English nouns (distinct)
WORDS = """apple river chair lion pencil garden window tiger candle bottle mirror rabbit forest ladder
island basket violin jacket turtle orange dragon silver pocket rocket wallet monkey saddle hammer kettle
button meadow parrot rubber shadow spider temple thunder valley wagon zebra anchor bridge cactus dolphin
engine falcon ginger harbor igloo jungle kitten lemon magnet needle ocean pepper quartz rocket salmon
tunnel umbrella velvet walnut yogurt beacon cobweb desert ember fossil goblet hazel insect jigsaw kernel
lantern marble nectar oyster pillow quiver raisin sandal tablet urchin vessel whistle yarn acorn blossom
copper donkey eagle feather glacier helmet ivory jelly koala lizard meteor noodle otter pirate quill
ribbon saucer trumpet unicorn vapor willow badger canyon daisy elbow fabric goose""".split()
WORDS = sorted(set(WORDS))

LAW_ITEMS = ("book", "film", "tool", "bike")


def logic_item(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 4)
    prompt = f"Sort alphabetically: {', '.join(words)}"
    return prompt, ", ".join(sorted(words))


def law_item(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(LAW_ITEMS)
    limit = rng.choice((7, 10, 14, 21, 30))
    rate = rng.randint(2, 9)
    days = rng.randint(limit - 3, limit + 12)
    fee = max(0, days - limit) * rate
    prompt = (f"Rule: a {thing} is free for {limit} days, then {rate} dollars per extra day. "
              f"Returned after {days} days. Late fee in dollars?")
    return prompt, str(fee)


def math_item(rng: random.Random) -> tuple[str, str]:
    start, step = rng.randint(1, 99), rng.randint(2, 19)
    seq = [start + i * step for i in range(4)]
    prompt = f"Next number: {', '.join(map(str, seq))}, ?"
    return prompt, str(start + 4 * step)


MAKERS = {"logic": logic_item, "law": law_item, "math": math_item}


def draw(rng: random.Random, n: int, seen: set[str], prefix: str) -> list[dict]:
    """n new items (task types in turn: logic, law, math, ...) whose prompts are not in `seen`."""
    out, misses = [], 0
    while len(out) < n:
        kind = TYPES[len(out) % len(TYPES)]
        prompt, answer = MAKERS[kind](rng)
        if prompt in seen:
            misses += 1
            if misses > 20000:  # 20000 repeats in a row: this task type has (almost) no new items left
                raise ValueError(f"cannot draw {n} distinct items: the {kind} task space is exhausted")
            continue
        misses = 0
        seen.add(prompt)
        out.append({"id": f"{prefix}{len(out)}", "type": kind, "prompt": prompt, "answer": answer})
    return out


def splits(seed: int = SEED, sizes: dict[str, int] = SPLITS) -> dict[str, list[dict]]:
    """Disjoint train/dev/test lists from one seed."""
    rng, seen = random.Random(seed), set()
    return {name: draw(rng, n, seen, f"{name}-") for name, n in sizes.items()}


def shipped_train_prompts() -> set[str]:
    path = HERE / "data" / "train.jsonl"
    if not path.is_file():
        return set()
    return {json.loads(line)["prompt"] for line in path.open(encoding="utf-8") if line.strip()}


def fresh(seed: int, n: int) -> list[dict]:
    """A draw of n items from `seed`, none of them in the shipped train split."""
    return draw(random.Random(seed), n, shipped_train_prompts(), f"s{seed}-")


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=None, help="Seed of a fresh draw (with --n and --out).")
    ap.add_argument("--n", type=int, default=600, help="Items in a fresh draw.")
    ap.add_argument("--out", type=Path, default=None, help="The JSONL file of a fresh draw.")
    ap.add_argument("--splits", type=Path, default=None, help="Write the shipped train/dev/test splits here.")
    args = ap.parse_args(argv)
    if args.splits is not None:
        for name, rows in splits().items():
            write_jsonl(rows, args.splits / f"{name}.jsonl")
            print(f"{args.splits / (name + '.jsonl')}: {len(rows)} items")
    elif args.seed is not None and args.out is not None:
        if args.n < 1:
            ap.error("--n must be >= 1")
        write_jsonl(fresh(args.seed, args.n), args.out)
        print(f"{args.out}: {args.n} items (seed {args.seed})")
    else:
        ap.error("give --splits DIR, or --seed S --n N --out FILE")


if __name__ == "__main__":
    main()
