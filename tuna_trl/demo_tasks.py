"""A synthetic instruction data set whose answers can be checked, for the offline demo and the tests.

Every row is in the Alpaca format (`instruction`, `input`, `output`) plus `id` and `task`. The data is a pure
function of the seed, so the train / held-out split is the same on every machine:

>>> from tuna_trl.demo_tasks import make_dataset
>>> train, heldout = make_dataset(num_train=8, num_heldout=4, seed=0)
>>> sorted(train[0])
['id', 'input', 'instruction', 'output', 'task']

Tasks (each answer is one line, checked by exact match, `tuna_trl.evaluation.superni.exact_match`):

* `add`: the sum of two numbers below 50, e.g. `Add the two numbers.` / `23 45` -> `68`.
* `max`: the largest of three numbers.
* `reverse`: the words in reverse order.
* `sort`: the words in alphabetical order.
* `first_letters`: the first letter of each word.
* `count`: how many times a letter appears in two words.

The list-valued tasks give ROUGE-L partial credit to near misses, so a rule judge ("exact match, then ROUGE-L
against the gold answer") can rank a model's samples; the number-valued ones only know right and wrong.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .evaluation.superni import exact_match
from .generation.rouge import rouge_l


WORDS = (
    "apple bird blue cake cat cloud dog door fish frog gold green hat king lamp leaf lion moon nest owl pear pink "
    "queen rain red ring rose ship sky star sun tree wolf"
).split()

TASKS = ("add", "max", "reverse", "sort", "first_letters", "count")

# a short prompt keeps the tiny demo models fast; any Alpaca-style template works with the pipeline
DEMO_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n{input}\n### Response:\n"


def _words(rng: random.Random, low: int = 3, high: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _add(rng):
    a, b = rng.randrange(50), rng.randrange(50)
    return "Add the two numbers.", f"{a} {b}", str(a + b)


def _max(rng):
    numbers = rng.sample(range(100), 3)
    return "Which number is the largest?", " ".join(map(str, numbers)), str(max(numbers))


def _reverse(rng):
    words = _words(rng)
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def _sort(rng):
    words = _words(rng)
    return "Sort the words alphabetically.", " ".join(words), " ".join(sorted(words))


def _first_letters(rng):
    words = _words(rng)
    return "Write the first letter of each word.", " ".join(words), " ".join(w[0] for w in words)


def _count(rng):
    words = _words(rng, 2, 2)
    letter = rng.choice(sorted(set("".join(words))))
    return f"How many times does the letter {letter} appear?", " ".join(words), str("".join(words).count(letter))


_MAKERS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": _add,
    "max": _max,
    "reverse": _reverse,
    "sort": _sort,
    "first_letters": _first_letters,
    "count": _count,
}


def solve(instruction: str, input: str | None) -> str:
    """The correct answer to a demo instruction, computed from the instruction and its input.

    >>> solve("Reverse the order of the words.", "red cat sun")
    'sun cat red'
    """
    words = (input or "").split()
    if instruction == "Add the two numbers.":
        return str(sum(int(w) for w in words))
    if instruction == "Which number is the largest?":
        return str(max(int(w) for w in words))
    if instruction == "Reverse the order of the words.":
        return " ".join(reversed(words))
    if instruction == "Sort the words alphabetically.":
        return " ".join(sorted(words))
    if instruction == "Write the first letter of each word.":
        return " ".join(w[0] for w in words)
    if instruction.startswith("How many times does the letter ") and instruction.endswith(" appear?"):
        letter = instruction[len("How many times does the letter ")]
        return str("".join(words).count(letter))
    raise ValueError(f"Not a demo task instruction: {instruction!r}")


def make_dataset(
    num_train: int = 2000, num_heldout: int = 300, seed: int = 0, tasks: tuple[str, ...] = TASKS
) -> tuple[list[dict], list[dict]]:
    """Distinct examples, round-robin over `tasks`, split into train and held-out (no instruction+input is in
    both). Returns two lists of Alpaca rows with `id` (`"<split>-<index>"`) and `task`."""
    unknown = [t for t in tasks if t not in _MAKERS]
    if unknown:
        raise ValueError(f"Unknown demo task(s) {unknown}; choose from {list(_MAKERS)}.")
    rng = random.Random(seed)
    rows, seen = [], set()
    total = num_train + num_heldout
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > 50 * total:
            raise ValueError(f"Could not draw {total} distinct examples from tasks {list(tasks)}; ask for fewer.")
        task = tasks[len(rows) % len(tasks)]
        instruction, input_text, output = _MAKERS[task](rng)
        if (instruction, input_text) in seen:
            continue
        seen.add((instruction, input_text))
        rows.append({"instruction": instruction, "input": input_text, "output": output, "task": task})
    rng.shuffle(rows)
    train = [{"id": f"train-{i}", **row} for i, row in enumerate(rows[:num_train])]
    heldout = [{"id": f"heldout-{i}", **row} for i, row in enumerate(rows[num_train:])]
    return train, heldout


def gold_match_score(response: str, reference: str | None) -> float:
    """The demo's rule judge score in [0, 2]: exact match with the gold answer plus ROUGE-L F against it."""
    if reference is None:
        raise ValueError("The rule judge needs the gold answer: rows must carry a `reference` (Alpaca `output`).")
    return exact_match(response, [reference]) + rouge_l(reference, response)


def annotate(rows: list[dict], echo_tasks: tuple[str, ...] = (), echo_rate: float = 0.0, seed: int = 0) -> list[dict]:
    """The rows as a careless annotator would have written them: for the tasks in `echo_tasks`, a share
    `echo_rate` of the answers just repeat the input instead of doing what the instruction says, a typical failure
    of weak instruction followers. Other answers are correct (`solve` gives the correct answer of any row)."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        echo = row["task"] in echo_tasks and rng.random() < echo_rate
        out.append({**row, "output": row["input"] if echo else row["output"]})
    return out


def corruptions(row: dict, rng: random.Random) -> list[str]:
    """Wrong answers to `row`, near misses first, that the rule judge scores strictly below the gold answer and
    strictly below each other (ties would make rank accuracy ill-defined); used to build a held-out ranked set."""
    gold = row["output"]
    if row["task"] in ("add", "max", "count"):
        value = int(gold)
        candidates = [str(value + 1 if value == 0 else value + rng.choice([-1, 1]))]
    else:
        words = gold.split()
        near = list(words)
        i = rng.randrange(len(near) - 1)
        near[i], near[i + 1] = near[i + 1], near[i]  # one adjacent swap
        candidates = [" ".join(near), " ".join(reversed(words)), " ".join(words[:1])]
    kept, last = [], gold_match_score(gold, gold)
    for candidate in candidates:
        score = gold_match_score(candidate, gold)
        if score < last:
            kept.append(candidate)
            last = score
    return kept
