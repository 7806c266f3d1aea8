"""Write the bundled demo data: a word-kind instruction set and a template English corpus.

    python examples/make_demo_data.py [--out examples/demo]

Deterministic (fixed seed, no network): re-running rewrites both files byte-identically.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
NUM_ROWS = 500
CORPUS_SENTENCES = 3500

INSTRUCTION = "Name the kind of each word."
# The answer is a pure function of the input: each word replaced by its kind (color, animal or thing), so
# held-out rows are new combinations of known words. The corpus states each word's kind in plain sentences
# ("The fox is an animal.") but never in this task's format, so the base model scores ~0 exact match.
MIN_WORDS, MAX_WORDS = 3, 3

COLORS = ["red", "blue", "green", "black", "white", "brown", "gray", "pink"]
ANIMALS = ["fox", "cat", "dog", "bird", "fish", "bear", "wolf", "frog", "duck", "goat", "owl", "hen"]
THINGS = ["tree", "hill", "lake", "road", "house", "box", "cup", "ball", "boat", "book", "door", "star"]
VERBS = ["runs", "sits", "jumps", "sleeps", "walks", "swims", "sings", "eats"]
PLACES = ["on the hill", "by the lake", "in the house", "near the road", "under the tree", "in the box"]
NAMES = ["Ann", "Bob", "Tom", "Sue", "Max", "Eve"]
WORDS = COLORS + ANIMALS + THINGS
KIND = {
    **dict.fromkeys(COLORS, "color"),
    **dict.fromkeys(ANIMALS, "animal"),
    **dict.fromkeys(THINGS, "thing"),
}

# Other instructions in the same scaffold, so the pretrained model knows the prompt format without ever
# seeing the reversal task (its exact match on the task must start near zero).
CORPUS_TASKS = {
    "Repeat the words.": lambda ws: " ".join(ws),
    "Name the first word.": lambda ws: ws[0],
    "Name the last word.": lambda ws: ws[-1],
    "Count the words.": lambda ws: str(len(ws)),
}


def _sentence(rng: random.Random) -> str:
    """One simple English sentence over the demo vocabulary."""
    color, animal, thing = rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(THINGS)
    verb, place, name = rng.choice(VERBS), rng.choice(PLACES), rng.choice(NAMES)
    templates = [
        f"The {color} {animal} {verb} {place}.",
        f"{name} sees a {color} {animal} near the {thing}.",
        f"A {animal} {verb} by the {color} {thing}.",
        f"{name} has a {color} {thing} and a {animal}.",
        f"The {animal} and the {thing} are {color}.",
        f"Where is the {color} {thing}? It is {place}.",
        f"{name} {verb} {place} with the {animal}.",
        f"Is the {animal} {color}? Yes, the {animal} is {color}.",
        f"The words are {color}, {animal} and {thing}.",
        f"The {animal} is an animal. {color.capitalize()} is a color. The {thing} is a thing.",
        f"A {thing} is a thing, not an animal. A {animal} is an animal, not a color.",
        f"{color.capitalize()} is a color, and the {thing} is {color}.",
    ]
    return rng.choice(templates)


def _prompt(instruction: str, inp: str, output: str) -> str:
    """The pipeline's alpaca prompt followed by its answer."""
    return f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n{output}"


def make_rows(rng: random.Random) -> list[dict[str, str]]:
    """The reversal rows; every input is a distinct list of distinct words."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < NUM_ROWS:
        words = rng.sample(WORDS, rng.randint(MIN_WORDS, MAX_WORDS))
        inp = " ".join(words)
        if inp in seen:
            continue
        seen.add(inp)
        rows.append({"instruction": INSTRUCTION, "input": inp, "output": " ".join(KIND[w] for w in words)})
    return rows


def make_corpus(rng: random.Random) -> str:
    """Paragraphs of template sentences, with scaffolded non-reversal tasks mixed in."""
    parts: list[str] = []
    paragraph: list[str] = []
    tasks = sorted(CORPUS_TASKS)
    for i in range(CORPUS_SENTENCES):
        paragraph.append(_sentence(rng))
        if len(paragraph) >= rng.randint(3, 6):
            parts.append(" ".join(paragraph))
            paragraph = []
        if i % 1 == 0:
            instruction = rng.choice(tasks)
            words = rng.sample(WORDS, rng.randint(2, 4))
            parts.append(_prompt(instruction, " ".join(words), CORPUS_TASKS[instruction](words)))
    if paragraph:
        parts.append(" ".join(paragraph))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo")
    args = parser.parse_args(argv)
    rng = random.Random(SEED)
    rows = make_rows(rng)
    corpus = make_corpus(rng)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "train.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
    with open(args.out / "corpus.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write(corpus)


if __name__ == "__main__":
    main()
