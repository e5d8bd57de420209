"""Writes the shipped self-distillation prompt set: train_prompts.jsonl and heldout_prompts.jsonl.

Run once by hand (`python pipeline/data/make_prompts.py`); the JSONL files are committed, so
training never depends on this script's randomness. Prompts are templates x topics, plus a list of
standalone questions, shuffled with a fixed seed. The held-out split uses templates and topics the
training split also uses, but never the same (template, topic) pair. A second round (`more_rows`)
appends further pairs to the training split only: unused first-round pairs, then pairs with new
topics and templates (1600 training prompts in all, 64 held out). A third round
(`third_rows`) appends 1600 more pairs drawn from all templates x topics not yet used by either
split (3200 training prompts in all).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = [
    "photosynthesis",
    "black holes",
    "the French Revolution",
    "machine learning",
    "volcanoes",
    "the water cycle",
    "climate change",
    "the human heart",
    "the Roman Empire",
    "electric cars",
    "honey bees",
    "the internet",
    "vaccines",
    "the Moon",
    "coffee",
    "chess",
    "the stock market",
    "recycling",
    "the Great Wall of China",
    "earthquakes",
    "solar panels",
    "dinosaurs",
    "the immune system",
    "jazz music",
    "ancient Egypt",
    "rainforests",
    "gravity",
    "sleep",
    "the printing press",
    "bicycles",
    "octopuses",
    "public libraries",
    "the Olympic Games",
    "renewable energy",
    "the piano",
    "glaciers",
    "DNA",
    "airplanes",
    "bread baking",
    "the Industrial Revolution",
    "friendship",
    "time management",
    "learning a new language",
    "healthy eating",
    "remote work",
    "gardening",
    "the ocean",
    "penguins",
    "rainbows",
    "the Renaissance",
    "smartphones",
    "marathon running",
    "meditation",
    "volunteering",
    "cloud computing",
    "the solar system",
    "trees",
    "money",
    "the camera",
    "board games",
]

TEMPLATES = [
    "Explain {t} to a ten-year-old.",
    "Write a short poem about {t}.",
    "Give me three interesting facts about {t}.",
    "What is {t}? Answer in one paragraph.",
    "List five tips related to {t}.",
    "Write a short story that involves {t}.",
    "Why is {t} important?",
    "Summarize the history of {t} in a few sentences.",
    "What are the pros and cons of {t}?",
    "Write a haiku about {t}.",
    "Describe {t} in simple words.",
    "How would you teach a beginner about {t}?",
    "Write a short blog post introduction about {t}.",
    "What are common misconceptions about {t}?",
    "Give a simple analogy that explains {t}.",
    "Write a tweet about {t}.",
    "What questions should I ask to learn more about {t}?",
    "Tell me a fun fact about {t} and explain why it is true.",
    "Write a friendly email to a colleague about {t}.",
    "Compare {t} with something from everyday life.",
    "Can you write a limerick about {t}?",
    "What would happen if {t} did not exist?",
    "Write a product description inspired by {t}.",
    "Explain {t} step by step.",
]

STANDALONE = [
    "What is 17 times 23?",
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "How do I make a cup of tea?",
    "What is the capital of Australia?",
    "Translate 'good morning' into French, Spanish and German.",
    "Write a SQL query that counts the rows of a table named users.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a recipe for pancakes.",
    "How many days are there in a leap year?",
    "Write a JavaScript function that adds two numbers.",
    "What causes the seasons on Earth?",
    "Suggest a name for a pet goldfish.",
    "How do I sort a list in Python?",
    "What is the boiling point of water in Fahrenheit?",
    "Write a thank-you note to a teacher.",
    "Explain what a variable is in programming.",
    "What is the largest planet in our solar system?",
    "Give me a workout plan for a beginner.",
    "How can I improve my handwriting?",
    "Write a function in C that returns the maximum of two integers.",
    "What is the Pythagorean theorem?",
    "Plan a one-day trip to Paris.",
    "What should I pack for a camping trip?",
    "Explain recursion with an example.",
    "Write a short motivational message for a student before an exam.",
    "What are the primary colors?",
    "How does a refrigerator keep food cold?",
    "Write a bash command that counts the lines in a file.",
    "What is a haiku?",
    "Give me five ideas for a birthday party.",
    "How do I convert Celsius to Fahrenheit?",
    "Write a regular expression that matches an email address.",
    "Why is the sky blue?",
    "What is the difference between weather and climate?",
    "How do magnets work?",
    "Write a short dialogue between a cat and a dog.",
    "What is an API?",
    "Explain the rules of tic-tac-toe.",
    "What are three ways to save money?",
]


# Added in a second round (more self-distillation data): new topics and templates. Their pairs
# are appended after the first round's rows, so earlier rows (and cached answers) never change.
MORE_TOPICS = [
    "the Eiffel Tower",
    "owls",
    "rice farming",
    "the Amazon river",
    "wind turbines",
    "tea",
    "the violin",
    "hurricanes",
    "the printing of money",
    "submarines",
    "the human brain",
    "spiders",
    "chocolate",
    "soccer",
    "the Arctic",
    "desert animals",
    "bridges",
    "robots",
    "the telephone",
    "origami",
    "mountains",
    "the library of Alexandria",
    "kangaroos",
    "nuclear energy",
    "the periodic table",
    "yoga",
    "podcasts",
    "the moon landing",
    "cheese",
    "sharks",
    "video games",
    "the metric system",
    "elephants",
    "fireworks",
    "skyscrapers",
    "the Silk Road",
    "mushrooms",
    "cryptography",
    "public transport",
    "the Vikings",
    "coral reefs",
    "plastic pollution",
    "the printing of books",
    "sunflowers",
    "pizza",
    "the Internet of Things",
    "batteries",
    "whales",
    "the Mona Lisa",
    "astronauts",
    "trains",
    "the Sahara desert",
    "photography",
    "the human skeleton",
    "rain",
    "wolves",
    "pyramids",
    "open source software",
    "the first computers",
    "tigers",
    "snow",
    "the Great Barrier Reef",
    "social media",
    "compost",
    "lighthouses",
    "the Beatles",
    "basketball",
    "ants",
    "artificial intelligence",
    "microwaves",
    "the Milky Way",
    "castles",
    "maps",
    "dolphins",
    "the printing of newspapers",
    "tornadoes",
    "cooking pasta",
    "the alphabet",
    "bees and flowers",
    "clocks",
    "the Internet's history",
    "volcanic islands",
    "apples",
    "the human eye",
    "electric guitars",
    "hot air balloons",
    "password security",
    "the seasons",
    "frogs",
    "Shakespeare",
    "the calendar",
    "penicillin",
    "saving water",
    "cats",
    "dogs",
    "horses",
    "the stars",
    "deserts",
    "forests",
    "rivers",
    "lakes",
    "islands",
    "cities",
    "villages",
    "museums",
    "schools",
    "hospitals",
    "farms",
    "markets",
    "airports",
    "space stations",
    "satellites",
    "comets",
    "the Sun",
    "Mars",
    "Jupiter",
    "light",
    "sound",
    "electricity",
    "magnetism",
    "friction",
    "energy",
    "atoms",
    "cells",
    "bacteria",
    "viruses",
    "fungi",
    "plants",
    "insects",
    "birds",
    "fish",
    "reptiles",
    "mammals",
    "fossils",
    "minerals",
    "weather forecasts",
    "clouds",
    "lightning",
    "fog",
    "ice",
    "oceans and tides",
]

MORE_TEMPLATES = [
    "Write a short paragraph about {t}.",
    "What are the most important things to know about {t}?",
    "Explain how {t} works.",
    "Write a quiz question about {t} with its answer.",
    "Give me a one-sentence summary of {t}.",
    "What is the future of {t}?",
    "Write a short speech about {t}.",
    "Describe {t} to someone who has never heard of it.",
    "List three facts about {t}.",
    "Write a children's story about {t}.",
    "What are some fun activities related to {t}?",
    "How has {t} changed over time?",
    "Write a short news article about {t}.",
    "Explain {t} in three sentences.",
    "What can we learn from {t}?",
    "Write a riddle about {t}.",
]


# The first round's sizes (`build`'s defaults); `more_rows` starts after the pairs they used.
FIRST_ROUND = {"seed": 0, "n_train": 320, "n_heldout": 64, "n_extra": 320}


def pairs_used(n_train: int, n_heldout: int, n_extra: int) -> int:
    """How many shuffled (template, topic) pairs `build` turns into prompts."""
    return n_train + n_heldout - len(STANDALONE) + n_extra


def build(seed: int = 0, n_train: int = 320, n_heldout: int = 64, n_extra: int = 320):
    """-> (train rows, held-out rows). The first n_train + n_heldout prompts are split as
    shuffled; `n_extra` further (template, topic) pairs, none used by the held-out split, are
    appended to the training split (so earlier rows and their cached answers never change)."""
    rng = random.Random(seed)
    pairs = [(tm, tp) for tm in TEMPLATES for tp in TOPICS]
    rng.shuffle(pairs)
    n_templated = n_train + n_heldout - len(STANDALONE)
    prompts = [tm.format(t=tp) for tm, tp in pairs[:n_templated]] + STANDALONE
    rng.shuffle(prompts)
    extra = [tm.format(t=tp) for tm, tp in pairs[n_templated : n_templated + n_extra]]
    rows = [{"id": f"p{i:04d}", "prompt": p} for i, p in enumerate(prompts + extra)]
    n = n_train + n_heldout
    return rows[:n_train] + rows[n:], rows[n_train:n]


def more_rows(first_id: int, seed: int = 1, n_grid: int = 500, n_more: int = 460) -> list[dict]:
    """Second-round training rows: `n_grid` first-round (template, topic) pairs that `build` left
    unused (so none is a held-out pair), then `n_more` pairs involving the new topics/templates,
    each set shuffled with `seed`. Ids continue from `first_id`."""
    first = dict(FIRST_ROUND)
    rng = random.Random(first.pop("seed"))
    pairs = [(tm, tp) for tm in TEMPLATES for tp in TOPICS]
    rng.shuffle(pairs)  # the same order `build` drew from
    grid = pairs[pairs_used(**first) :]
    rng = random.Random(seed)
    rng.shuffle(grid)
    new = [(tm, tp) for tm in TEMPLATES + MORE_TEMPLATES for tp in TOPICS + MORE_TOPICS]
    new = [p for p in new if p[0] in MORE_TEMPLATES or p[1] in MORE_TOPICS]
    rng.shuffle(new)
    prompts = [tm.format(t=tp) for tm, tp in grid[:n_grid] + new[:n_more]]
    return [{"id": f"p{first_id + i:04d}", "prompt": p} for i, p in enumerate(prompts)]


def third_rows(used: list[dict], seed: int = 2, n: int = 1600) -> list[dict]:
    """`n` further training rows: (template, topic) pairs of all templates x topics whose prompt
    is not among `used` (every row of both splits so far, so no held-out pair either), shuffled
    with `seed`. Ids continue after the largest used id."""
    seen = {row["prompt"] for row in used}
    pairs = [(tm, tp) for tm in TEMPLATES + MORE_TEMPLATES for tp in TOPICS + MORE_TOPICS]
    fresh = [tm.format(t=tp) for tm, tp in pairs if tm.format(t=tp) not in seen]
    random.Random(seed).shuffle(fresh)
    if len(fresh) < n:
        raise ValueError(f"only {len(fresh)} unused pairs left, {n} asked for")
    first_id = 1 + max(int(row["id"][1:]) for row in used)
    return [{"id": f"p{first_id + i:04d}", "prompt": p} for i, p in enumerate(fresh[:n])]


def main() -> None:
    here = Path(__file__).parent
    train, heldout = build(**FIRST_ROUND)
    train += more_rows(len(train) + len(heldout))
    train += third_rows(train + heldout)
    for name, rows in (("train_prompts.jsonl", train), ("heldout_prompts.jsonl", heldout)):
        with open(here / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} prompts to {here / name}")


if __name__ == "__main__":
    main()
