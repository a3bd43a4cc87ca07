"""A long built-in document with one fact buried in it, and the question that asks for it.

The text is generated from a fixed seed (same words every run, no downloads): the daily log
of a fictional research station. One entry, at a chosen depth, holds the radio room's pass
key; the question asks for it, so the answer can be checked automatically.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_WEATHER = ["clear and cold", "overcast with light snow", "windy, gusts from the north",
            "foggy until noon", "bright sun, the ice glittering", "a steady drizzle",
            "calm, with high thin clouds", "a storm rolling in from the west"]
_TASKS = ["checked the generator and topped up its oil", "recalibrated the anemometer on the mast",
          "sorted the seed samples into the cold store", "repaired a torn seam in the greenhouse cover",
          "logged the tide gauge readings", "cleaned the solar panels of frost",
          "counted the seabirds on the northern cliffs", "replaced a cracked pane in the mess window",
          "tested the backup radio on the emergency band", "inventoried the medical kit",
          "dug out the path to the boat shed", "serviced the snow vehicle's tracks"]
_NAMES = ["Ada", "Bruno", "Chen", "Dagny", "Emeka", "Farah", "Goran", "Hana"]
_MEALS = ["lentil soup and bread", "fish stew", "rice with dried vegetables", "pancakes",
          "barley porridge", "tinned peaches", "roast potatoes", "noodles with chili oil"]
_NOTES = ["Morale is good.", "Everyone is tired but cheerful.", "The cat slept by the stove all day.",
          "We played cards after dinner.", "Someone left the greenhouse door open again.",
          "The aurora was faint but visible.", "The supply ship is still three weeks away.",
          "We read aloud from the old atlas in the evening."]

QUESTION = "According to the log, what is the pass key for the radio room? Answer with the number only."


@dataclass(frozen=True)
class DemoDocument:
    """A generated document, the question about it, and the answer a correct model gives."""

    text: str
    question: str
    answer: str

    def prompt(self) -> str:
        return f"{self.text}\n\n{self.question}"

    def is_correct(self, generated: str) -> bool:
        return self.answer in generated


def _entry(rng: random.Random, day: int) -> str:
    a, b = rng.sample(_NAMES, 2)
    return (
        f"Day {day}. Weather: {rng.choice(_WEATHER)}. {a} {rng.choice(_TASKS)}, "
        f"and {b} {rng.choice(_TASKS)}. Dinner was {rng.choice(_MEALS)}. {rng.choice(_NOTES)}"
    )


def build_document(num_entries: int = 70, depth: float = 0.5, seed: int = 2511) -> DemoDocument:
    """About 50 tokens per entry: the default (70 entries) is ~3,600 tokens in the chat template."""
    if num_entries < 1:
        raise ValueError(f"num_entries must be >= 1, got {num_entries}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    entries = [_entry(rng, day) for day in range(1, num_entries + 1)]
    fact = f"IMPORTANT: the pass key for the radio room is {key}. Remember it: {key}."
    entries.insert(round(depth * num_entries), fact)
    text = "Research station log.\n\n" + "\n".join(entries)
    return DemoDocument(text=text, question=QUESTION, answer=key)


def entries_for_tokens(tokens: int) -> int:
    """Number of entries that gives roughly `tokens` tokens with the default model's tokenizer."""
    return max(1, round(tokens / 51))
