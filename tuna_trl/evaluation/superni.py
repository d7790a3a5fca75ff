"""Super-NaturalInstructions evaluation (Wang et al., 2022), as in the Tuna paper: the task definition plus k
positive examples (0-shot and 2-shot), greedy decoding, ROUGE-L against the references.

The metric is the official one (`natural-instructions/eval/automatic/evaluation.py`): per instance, the ROUGE-L
F-measure of `rouge_score.RougeScorer(["rougeL"], use_stemmer=True)` maximised over the instance's references,
then averaged and multiplied by 100. Exact match uses the official normalisation (lower case, no punctuation, single
spaces). The "tk" prompt is the official Tk-Instruct encoding (`ni_collator.py`: definition, positive examples
without explanations, no negative examples), leading spaces included.
"""

from __future__ import annotations

import json
import logging
import os
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..generation.inputs import ALPACA_PROMPT_WITH_INPUT, InputError
from ..generation.rouge import rouge_l


logger = logging.getLogger(__name__)

PROMPT_FORMATS = ("tk", "alpaca")
_PUNCTUATION = frozenset(string.punctuation)


@dataclass
class SuperNIInstance:
    """One test instance: `references` are all accepted outputs (the metric takes the best match)."""

    id: str
    input: str
    references: list[str]


@dataclass
class SuperNITask:
    """A task read from the official JSON format. `positive_examples` are `{"input", "output"}` dicts."""

    name: str
    definition: str
    positive_examples: list[dict] = field(default_factory=list)
    instances: list[SuperNIInstance] = field(default_factory=list)


def shipped_task_dir() -> Path:
    """The small synthetic task set shipped with tuna-trl (`tuna_trl/data/superni/`), in the official format."""
    return Path(str(resources.files("tuna_trl").joinpath("data/superni")))


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: expected a string, got {type(value).__name__}.")
    return value


def load_superni_task(path: str | os.PathLike) -> SuperNITask:
    """Read one task file (`Definition` a string or a list of strings, `Positive Examples` with `input`/`output`,
    `Instances` with `input`, a list `output` and an optional `id`; other fields are ignored).

    Raises:
        InputError (a ValueError): naming the file and the field or instance that is malformed.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err}).") from err
    for key in ("Definition", "Instances"):
        if key not in data:
            raise InputError(f"{path}: missing field {key!r}; is this a Super-NaturalInstructions task file?")
    definition = data["Definition"]
    if isinstance(definition, list):  # some releases split the definition into several strings
        definition = " ".join(_text(d, f"{path}, Definition[{i}]").strip() for i, d in enumerate(definition))
    definition = _text(definition, f"{path}, Definition")
    examples = []
    for i, example in enumerate(data.get("Positive Examples", [])):
        where = f"{path}, Positive Examples[{i}]"
        if not isinstance(example, dict) or "input" not in example or "output" not in example:
            raise InputError(f"{where}: expected an object with 'input' and 'output'.")
        examples.append(
            {"input": _text(example["input"], where + ".input"), "output": _text(example["output"], where + ".output")}
        )
    instances = []
    for i, instance in enumerate(data["Instances"]):
        where = f"{path}, Instances[{i}]"
        if not isinstance(instance, dict) or "input" not in instance or "output" not in instance:
            raise InputError(f"{where}: expected an object with 'input' and 'output'.")
        references = instance["output"]
        if isinstance(references, str):
            references = [references]
        if not references:
            raise InputError(f"{where}.output: the list of reference outputs is empty.")
        references = [_text(r, f"{where}.output[{k}]") for k, r in enumerate(references)]
        instance_id = str(instance.get("id", f"{path.stem}-{i}"))
        instances.append(SuperNIInstance(instance_id, _text(instance["input"], where + ".input"), references))
    return SuperNITask(path.stem, definition, examples, instances)


def load_superni_tasks(
    task_dir: str | os.PathLike | None = None, tasks: list[str] | None = None, max_instances: int | None = None
) -> list[SuperNITask]:
    """Every `*.json` task in `task_dir` (default: `shipped_task_dir()`), sorted by name.

    Args:
        tasks: keep only these task names (file names without `.json`), e.g. the official `test_tasks.txt` list.
        max_instances: keep the first this many instances of each task (the official evaluation uses 100).
    """
    task_dir = Path(task_dir) if task_dir is not None else shipped_task_dir()
    if not task_dir.is_dir():
        raise InputError(f"Super NI task directory {task_dir} does not exist.")
    paths = {p.stem: p for p in sorted(task_dir.glob("*.json"))}
    if tasks is not None:
        missing = [name for name in tasks if name not in paths]
        if missing:
            raise InputError(f"Task {missing[0]!r} has no file {missing[0]}.json in {task_dir}.")
        paths = {name: paths[name] for name in tasks}
    if not paths:
        raise InputError(f"No Super NI task files (*.json) in {task_dir}.")
    loaded = [load_superni_task(p) for p in paths.values()]
    if max_instances is not None:
        for task in loaded:
            task.instances = task.instances[:max_instances]
    return loaded


def _end_with_punctuation(text: str) -> str:
    # as in ni_collator.py: a period is added unless the text already ends with punctuation
    return text if text and text[-1] in string.punctuation else text + "."


def build_superni_prompt(task: SuperNITask, instance_input: str, num_shots: int = 0, prompt_format: str = "tk") -> str:
    """The prompt for one instance with the task definition and the first `num_shots` positive examples.

    `prompt_format="tk"` is the official Tk-Instruct encoding, ending in `"Output: "`; `"alpaca"` puts the
    definition and examples in an Alpaca prompt's Instruction block and the instance in its Input block, for models
    fine-tuned on Alpaca (as in the paper).
    """
    examples = task.positive_examples[:num_shots]
    if prompt_format == "tk":
        text = _end_with_punctuation("Definition: " + task.definition.strip()) + "\n\n"
        for k, example in enumerate(examples, 1):
            shot = _end_with_punctuation(f" Positive Example {k} -\nInput: {example['input'].strip()}") + "\n"
            shot = _end_with_punctuation(shot + f" Output: {example['output'].strip()}") + "\n"
            text += shot + "\n"
        query = _end_with_punctuation(f"Now complete the following example -\nInput: {instance_input.strip()}")
        return text + query + "\nOutput: "
    if prompt_format == "alpaca":
        instruction = task.definition.strip()
        for k, example in enumerate(examples, 1):
            instruction += f"\n\nExample {k} -\nInput: {example['input'].strip()}\nOutput: {example['output'].strip()}"
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=instance_input.strip())
    raise ValueError(f"Unknown Super NI prompt format {prompt_format!r}; choose one of {PROMPT_FORMATS}.")


def normalize_answer(text: str) -> str:
    """The official exact-match normalisation: lower case, punctuation removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def rouge_l_max(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure (stemming on) of `prediction` against its best-matching reference, in [0, 1]."""
    return max(rouge_l(reference, prediction, use_stemmer=True) for reference in references)


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(reference) for reference in references))


def score_predictions(records: list[dict]) -> dict:
    """Aggregate scored instances into per-task and overall metrics, x100.

    Args:
        records: dicts with `task`, `prediction` and `references`; `rougeL` and `exact_match` (in [0, 1]) are
            added to each record in place.

    Returns:
        `{"rougeL", "exact_match"}` averaged over all instances (as the official script does), `"rougeL_task_mean"`
        (the mean of the per-task scores), `"num_instances"` and `"tasks": {name: {"rougeL", "exact_match",
        "num_instances"}}`.
    """
    by_task: dict[str, list[dict]] = {}
    for record in records:
        record["rougeL"] = rouge_l_max(record["prediction"], record["references"])
        record["exact_match"] = exact_match(record["prediction"], record["references"])
        by_task.setdefault(record["task"], []).append(record)

    def mean(values) -> float:
        values = list(values)
        return 100.0 * sum(values) / len(values) if values else 0.0

    tasks = {
        name: {
            "rougeL": mean(r["rougeL"] for r in rows),
            "exact_match": mean(r["exact_match"] for r in rows),
            "num_instances": len(rows),
        }
        for name, rows in by_task.items()
    }
    return {
        "rougeL": mean(r["rougeL"] for r in records),
        "exact_match": mean(r["exact_match"] for r in records),
        "rougeL_task_mean": sum(t["rougeL"] for t in tasks.values()) / len(tasks) if tasks else 0.0,
        "num_instances": len(records),
        "tasks": tasks,
    }


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=len(text))
    return text[:cut].strip()


def evaluate_superni(
    model,
    tokenizer,
    task_dir: str | os.PathLike | None = None,
    num_shots: tuple[int, ...] = (0, 2),
    max_new_tokens: int = 128,
    batch_size: int = 8,
    prompt_format: str = "tk",
    tasks: list[str] | None = None,
    max_instances: int | None = None,
    stop: tuple[str, ...] = (),
    progress: bool = True,
) -> dict:
    """Greedy-decode every instance of every task with `num_shots` in-context examples and score it.

    Args:
        model, tokenizer: a `transformers` causal LM and its tokenizer (see `generate_answers`).
        task_dir: a directory of official task JSON files (default: the shipped synthetic tasks).
        stop: cut each prediction at the first of these strings (e.g. `("\\n\\n",)` for a base model that keeps
            writing examples); empty: keep the whole completion.

    Returns:
        `{"prompt_format", "num_tasks", "shots": {"0": score_predictions(...), "2": ...}, "predictions": [{"task",
        "id", "num_shots", "prediction", "references", "rougeL", "exact_match"}, ...]}`; scores are x100.
    """
    from .generate import generate_answers

    loaded = load_superni_tasks(task_dir, tasks=tasks, max_instances=max_instances)
    result = {"prompt_format": prompt_format, "num_tasks": len(loaded), "shots": {}, "predictions": []}
    for k in num_shots:
        short = [t.name for t in loaded if len(t.positive_examples) < k]
        if short:
            logger.warning(
                "%d task(s) have fewer than %d positive examples and use all they have: %s", len(short), k, short
            )
        records, prompts = [], []
        for task in loaded:
            for instance in task.instances:
                prompts.append(build_superni_prompt(task, instance.input, k, prompt_format))
                records.append(
                    {"task": task.name, "id": instance.id, "num_shots": k, "references": instance.references}
                )
        predictions = generate_answers(model, tokenizer, prompts, batch_size, max_new_tokens, progress=progress)
        for record, prediction in zip(records, predictions):
            record["prediction"] = _cut_at_stop(prediction, stop) if stop else prediction
        result["shots"][str(k)] = score_predictions(records)
        result["predictions"].extend(records)
    return result


def superni_markdown(result: dict) -> str:
    """The ROUGE-L (and exact match) table of an `evaluate_superni` result: one row per task, one column per k."""
    from .report import markdown_table

    shots = list(result["shots"])
    headers = ["task"] + [f"ROUGE-L {k}-shot" for k in shots] + [f"EM {k}-shot" for k in shots]
    names = list(next(iter(result["shots"].values()))["tasks"]) if shots else []
    rows = [
        [name]
        + [result["shots"][k]["tasks"][name]["rougeL"] for k in shots]
        + [result["shots"][k]["tasks"][name]["exact_match"] for k in shots]
        for name in names
    ]
    rows.append(
        ["**mean (all instances)**"]
        + [result["shots"][k]["rougeL"] for k in shots]
        + [result["shots"][k]["exact_match"] for k in shots]
    )
    rows.append(
        ["mean of task means"] + [result["shots"][k]["rougeL_task_mean"] for k in shots] + [None for _ in shots]
    )
    return "## Super-NaturalInstructions\n\n" + markdown_table(headers, rows) + "\n"
