"""Data of the `tinystories_cloze` task: the shipped items and how they were built.

lm-eval imports this file through the task YAML (`custom_dataset: !function cloze_data.load`),
so the task reads `tinystories_cloze.jsonl` beside it from any working folder, offline. `build`
regenerates that file from the TinyStories excerpt the package ships (tests check they agree):

    python compressor/assets/tasks/tinystories_cloze/cloze_data.py   # rewrites the .jsonl

Each item is one paragraph of the excerpt's second half (the held-out half: training on
`default` data reads the first half) cut before the last word of one of its sentences; the
choices are that word and three last words of other sentences, in a seeded order.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ITEMS = HERE / "tinystories_cloze.jsonl"
EXCERPT = HERE.parent.parent / "text" / "tinystories_excerpt.txt"
NUM_ITEMS = 200
NUM_CHOICES = 4
SEED = 0
# A sentence's last word: letters only, 3+ of them, right before . ! or ?
_LAST_WORD = re.compile(r"\b([A-Za-z]{3,})([.!?])")


def load(**_ignored):
    """The items as a `datasets.DatasetDict` with one `test` split (lm-eval's custom_dataset)."""
    import datasets

    rows = [json.loads(line) for line in ITEMS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def build(text: str, num_items: int = NUM_ITEMS, seed: int = SEED) -> list[dict]:
    """Cloze items from the held-out half of `text` (paragraphs separated by blank lines)."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    heldout = paragraphs[len(paragraphs) // 2:]
    cuts = [(p, m) for p in heldout for m in [_pick_cut(p)] if m is not None]
    pool = sorted({m.group(1) for _, m in cuts})
    rng = random.Random(seed)
    items = []
    for paragraph, match in cuts[:num_items]:
        answer = match.group(1)
        choices = [answer, *rng.sample([w for w in pool if w.lower() != answer.lower()], NUM_CHOICES - 1)]
        rng.shuffle(choices)
        items.append({"context": paragraph[:match.start(1)].rstrip(), "choices": choices,
                      "label": choices.index(answer)})
    return items


def _pick_cut(paragraph: str):
    """The last sentence ending of the paragraph whose final word qualifies (None if none does);
    the first 80 characters are skipped so every item has some context."""
    matches = [m for m in _LAST_WORD.finditer(paragraph) if m.start() >= 80]
    return matches[-1] if matches else None


def write(path: Path = ITEMS) -> None:
    items = build(EXCERPT.read_text(encoding="utf-8"))
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")


if __name__ == "__main__":
    write()
