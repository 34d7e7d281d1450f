"""A synthetic chat set for the SFT evidence tests: made-up names, each with a colour, asked about in
several phrasings. Each name's question in one phrasing is held out of training (the phrasing is
trained with other names), so answering it needs the fact, not the memorised question."""

import json
import random
from pathlib import Path

NAMES = ["Zorbo", "Mivla", "Kettu", "Drawn", "Pelio", "Quastr", "Borim", "Taffel", "Yuven", "Grelk",
         "Nodia", "Wimsa", "Lurko", "Fendar", "Sapho", "Vorrel", "Ixtal", "Hobbin", "Cerwa", "Joska",
         "Ulmer", "Rask", "Omsby", "Tirrel"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
PHRASINGS = ["What colour is {}?", "Which colour does {} have?", "Tell me the colour of {}.",
             "{} has which colour?"]


def colour(name: str) -> str:
    return COLOURS[NAMES.index(name) % len(COLOURS)]


def held_out(i: int) -> int:
    """The phrasing of name i kept out of training."""
    return i % len(PHRASINGS)


def questions(trained: bool) -> list[tuple[str, str]]:
    """(question, answer) pairs: the trained ones, or the held-out ones."""
    return [(p.format(n), colour(n)) for i, n in enumerate(NAMES) for j, p in enumerate(PHRASINGS)
            if (j != held_out(i)) == trained]


def write(path: Path, conversations: int = 600, seed: int = 0) -> Path:
    """A JSONL chat set: conversations of 1 to 3 trained questions, some opened by a system message."""
    rng = random.Random(seed)
    pairs = questions(trained=True)
    with open(path, "w") as f:
        for _ in range(conversations):
            messages = [{"role": "system", "content": "Answer with one word."}] if rng.random() < 0.3 else []
            for question, answer in rng.sample(pairs, rng.randint(1, 3)):
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer + "."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
