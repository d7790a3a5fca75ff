"""Super-NaturalInstructions evaluation: the official task format, 0/2-shot prompts, ROUGE-L equal to `rouge_score`
computed directly, batched greedy generation, and the `eval rouge` command."""

import json

import pytest
from rouge_score import rouge_scorer

from tuna_trl.evaluation import (
    build_superni_prompt,
    evaluate_superni,
    generate_answers,
    load_superni_task,
    load_superni_tasks,
    score_predictions,
    shipped_task_dir,
)
from tuna_trl.evaluation.superni import SuperNITask


SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def reference_rouge(prediction, references):
    """The official metric, written out: best ROUGE-L F over the references, x100."""
    return 100 * max(SCORER.score(target=r, prediction=prediction)["rougeL"].fmeasure for r in references)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a model this small gains nothing from threads, and on a busy machine their spinning costs seconds per call
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tuna_trl.tiny import build_model, build_tokenizer, save_tiny

    path = save_tiny(str(tmp_path_factory.mktemp("tiny")))
    tokenizer = build_tokenizer()
    return path, build_model(tokenizer), tokenizer


TASK = SuperNITask(
    name="t",
    definition="Reverse the list",
    positive_examples=[
        {"input": "[1, 2]", "output": "[2, 1]"},
        {"input": "Is it 3?", "output": "yes"},
        {"input": "x", "output": "y"},
    ],
)


def test_prompt_zero_shot():
    assert build_superni_prompt(TASK, " [5, 6] ", num_shots=0) == (
        "Definition: Reverse the list.\n\nNow complete the following example -\nInput: [5, 6]\nOutput: "
    )


def test_prompt_two_shot():
    # the official Tk-Instruct encoding: a period only where the text does not end with punctuation
    assert build_superni_prompt(TASK, "[5, 6]", num_shots=2) == (
        "Definition: Reverse the list.\n\n"
        " Positive Example 1 -\nInput: [1, 2]\n Output: [2, 1]\n\n"
        " Positive Example 2 -\nInput: Is it 3?\n Output: yes.\n\n"
        "Now complete the following example -\nInput: [5, 6]\nOutput: "
    )


def test_prompt_alpaca():
    prompt = build_superni_prompt(TASK, "[5, 6]", num_shots=1, prompt_format="alpaca")
    assert prompt.endswith(
        "### Instruction:\nReverse the list\n\nExample 1 -\nInput: [1, 2]\nOutput: [2, 1]\n\n"
        "### Input:\n[5, 6]\n\n### Response:\n"
    )
    with pytest.raises(ValueError, match="prompt format"):
        build_superni_prompt(TASK, "x", prompt_format="chatml")


def test_official_task_format(tmp_path):
    task = {
        "Definition": ["Answer the question", "briefly."],  # some releases give a list of strings
        "Positive Examples": [{"input": "2+2?", "output": "4", "explanation": "sum"}],
        "Negative Examples": [{"input": "2+2?", "output": "5", "explanation": "wrong"}],
        "Instances": [
            {"id": "task9-abc", "input": "1+1?", "output": ["2", "two"]},
            {"input": "3+3?", "output": ["6"]},
        ],
    }
    (tmp_path / "task9_add.json").write_text(json.dumps(task))
    loaded = load_superni_task(tmp_path / "task9_add.json")
    assert loaded.name == "task9_add" and loaded.definition == "Answer the question briefly."
    assert [(i.id, i.references) for i in loaded.instances] == [("task9-abc", ["2", "two"]), ("task9_add-1", ["6"])]
    task["Instances"][1] = {"input": "3+3?"}
    (tmp_path / "task9_add.json").write_text(json.dumps(task))
    with pytest.raises(ValueError, match=r"task9_add.json, Instances\[1\]"):
        load_superni_task(tmp_path / "task9_add.json")
    with pytest.raises(ValueError, match="has no file nope.json"):
        load_superni_tasks(tmp_path, tasks=["nope"])


def test_shipped_tasks():
    tasks = load_superni_tasks()
    assert len(tasks) >= 4 and all(len(t.positive_examples) >= 2 and len(t.instances) >= 3 for t in tasks)
    assert any(len(i.references) > 1 for t in tasks for i in t.instances)
    assert load_superni_tasks(shipped_task_dir(), max_instances=1)[0].instances == tasks[0].instances[:1]


def test_rouge_equals_rouge_score():
    tasks = load_superni_tasks()
    records = []
    # predictions that exercise stemming ("reversing" ~ "reverse"), case, partial overlap and multiple references
    predictions = [
        "The reversed list is [1, 2]",
        "TUNA",
        "three items",
        "The smallest numbers, 2, come first",
        "",
        "Sorting puts 4 first",
    ]
    for k, (task, instance) in enumerate((t, i) for t in tasks for i in t.instances):
        prediction = predictions[k % len(predictions)] + " " + instance.references[-1][: 3 + k % 7]
        records.append({"task": task.name, "prediction": prediction, "references": instance.references})
    scores = score_predictions(records)
    expected = [reference_rouge(r["prediction"], r["references"]) for r in records]
    assert [100 * r["rougeL"] for r in records] == pytest.approx(expected, abs=1e-9)
    assert scores["rougeL"] == pytest.approx(sum(expected) / len(expected), abs=1e-9)
    for task in tasks:
        mine = [e for e, r in zip(expected, records) if r["task"] == task.name]
        assert scores["tasks"][task.name]["rougeL"] == pytest.approx(sum(mine) / len(mine), abs=1e-9)
        assert scores["tasks"][task.name]["num_instances"] == len(task.instances)
    assert 0 < scores["rougeL"] < 100


def test_exact_match_normalisation():
    records = [
        {"task": "t", "prediction": " Two. ", "references": ["3", "two"]},
        {"task": "t", "prediction": "2", "references": ["3"]},
    ]
    assert score_predictions(records)["exact_match"] == 50.0


def test_batched_generation_equals_one_by_one(tiny):
    _, model, tokenizer = tiny
    model.train()  # as in the middle of training: generation must leave the mode as it found it
    prompts = ["Reverse [1, 2, 3].", "hi", "the quick brown fox jumps over the lazy dog", "sort 3 2 1 please"]
    batched = generate_answers(model, tokenizer, prompts, batch_size=4, max_new_tokens=6, progress=False)
    assert batched == generate_answers(model, tokenizer, prompts, batch_size=1, max_new_tokens=6, progress=False)
    assert len(batched) == 4 and model.training


def test_evaluate_superni_scores_what_it_generated(tiny):
    _, model, tokenizer = tiny
    result = evaluate_superni(
        model, tokenizer, num_shots=(0, 2), max_new_tokens=4, batch_size=8, max_instances=2, progress=False
    )
    tasks = load_superni_tasks(max_instances=2)
    assert set(result["shots"]) == {"0", "2"} and result["num_tasks"] == len(tasks)
    assert len(result["predictions"]) == 2 * sum(len(t.instances) for t in tasks)
    for k in ("0", "2"):
        records = [r for r in result["predictions"] if str(r["num_shots"]) == k]
        expected = [reference_rouge(r["prediction"], r["references"]) for r in records]
        assert result["shots"][k]["rougeL"] == pytest.approx(sum(expected) / len(expected), abs=1e-9)


def test_cli_rouge(tiny, tmp_path):
    from tuna_trl.cli import main

    path, _, _ = tiny
    out = tmp_path / "eval"
    argv = [
        "eval",
        "rouge",
        "--model",
        path,
        "--shots",
        "0",
        "2",
        "--max-new-tokens",
        "3",
        "--max-instances",
        "1",
        "--tasks",
        "synth001_reverse_list",
        "synth003_count_items",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    result = json.loads((out / "superni.json").read_text())
    assert set(result["shots"]["2"]["tasks"]) == {"synth001_reverse_list", "synth003_count_items"}
    assert "| synth001_reverse_list |" in (out / "superni.md").read_text()
    assert len((out / "superni_predictions.jsonl").read_text().splitlines()) == 4
