"""The pipeline on a tiny config, end to end, with reruns that skip, resume and refuse changed settings."""

import json
import logging

import pytest
import torch
import yaml

from tuna_trl.demo_tasks import DEMO_PROMPT_TEMPLATE, corruptions, gold_match_score, make_dataset
from tuna_trl.pipeline import Pipeline, PipelineError, load_config, resolve_stages


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and on a shared machine two threads waiting on each other can be
    many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base model, a few Alpaca rows and a config running every stage for a couple of steps."""
    from tuna_trl.tiny import save_tiny

    root = tmp_path_factory.mktemp("pipeline")
    train, _ = make_dataset(num_train=12, num_heldout=2, seed=0)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in train))
    corpus = [DEMO_PROMPT_TEMPLATE.format(**row) + row["output"] for row in train]
    model = save_tiny(str(root / "base"), corpus=corpus, hidden_size=32, num_hidden_layers=1, max_position_embeddings=64)
    training = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1}
    config = {
        "output_dir": str(root / "run"),
        "variant": "tuna",
        "model": model,
        "data": {"path": str(data), "prompt_template": DEMO_PROMPT_TEMPLATE},
        "training": training,
        "stages": {
            "probabilistic": {"teacher": {"model": model, "batch_size": 16}, "n": 2, "max_new_tokens": 6},
            "contextual": {
                "judge": {"type": "rule", "score": "exact_match_rouge_l", "answers": "demo_tasks"},
                "n": 3, "max_new_tokens": 6, "max_error_fraction": 0.5,
            },
            "tuna": {"training": {"learning_rate": 1e-4, "save_steps": 1}},
        },
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def manifest(root, stage):
    return json.loads((root / "run" / stage / "manifest.json").read_text())


def test_pipeline_end_to_end_and_rerun(setup, caplog):
    from tuna_trl.cli import main

    root, config = setup
    assert main(["pipeline", "--config", str(config), "--no-progress"]) == 0
    stages = ["sft", "probabilistic", "tuna_p", "contextual", "tuna"]
    for stage in stages:
        m = manifest(root, stage)
        assert m["status"] == "done", stage
        for output in m["outputs"].values():
            assert (root / "run" / stage / output).exists()
    assert manifest(root, "tuna")["settings"]["training"]["learning_rate"] == 1e-4
    assert manifest(root, "tuna_p")["metrics"]["global_step"] == 2
    assert not (root / "run" / "tuna" / "checkpoints").exists()  # removed once the model is saved

    # generation rows are in the core format and in the judge's order
    rows = [json.loads(line) for line in (root / "run" / "contextual" / "data.jsonl").read_text().splitlines()]
    assert rows and all({"prompt", "completions", "reference", "scores"} <= set(row) for row in rows)
    for row in rows:
        assert row["prompt"].startswith("### Instruction:\n") and row["prompt"].endswith("### Response:\n")
        assert [gold_match_score(c, row["reference"]) for c in row["completions"]] == row["scores"]
        assert row["scores"] == sorted(set(row["scores"]), reverse=True)  # strict: one response per score
    assert manifest(root, "contextual")["inputs"]["tuna_p"] == {"model": "model"}

    # a rerun skips every finished stage and leaves them as they were
    run_ids = {stage: manifest(root, stage)["run_id"] for stage in stages}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tuna_trl.pipeline"):
        assert main(["pipeline", "--config", str(config), "--no-progress"]) == 0
    assert sum("done already, skipped" in r.getMessage() for r in caplog.records) == 5
    assert {stage: manifest(root, stage)["run_id"] for stage in stages} == run_ids

    # changed settings are refused, not silently mixed with the old results
    code = main(["pipeline", "--config", str(config), "--set", "stages.tuna.training.learning_rate=2e-4", "--no-progress"])
    assert code == 2
    # ... while operational settings (logging, batch size of a local model) do not invalidate anything
    assert main(["pipeline", "--config", str(config), "--set", "training.logging_steps=5",
                 "--set", "stages.contextual.judge_workers=2", "--no-progress"]) == 0
    assert {stage: manifest(root, stage)["run_id"] for stage in stages} == run_ids

    # --redo reruns a stage and every stage built on it; the others stay
    assert main(["stage", "contextual", "--config", str(config), "--redo", "contextual", "--no-progress"]) == 0
    assert manifest(root, "contextual")["run_id"] != run_ids["contextual"]
    assert manifest(root, "tuna_p")["run_id"] == run_ids["tuna_p"]
    assert main(["pipeline", "--config", str(config), "--no-progress"]) == 2  # tuna was built on the old data
    assert main(["pipeline", "--config", str(config), "--redo", "tuna", "--no-progress"]) == 0
    assert manifest(root, "tuna")["run_id"] != run_ids["tuna"]


def test_interrupted_stages_resume(setup):
    """A training stage resumes from its last checkpoint; a generation stage from the rows already written."""
    import shutil

    root, config_path = setup
    config = load_config(config_path)
    config["output_dir"] = str(root / "resume")
    config["variant"] = "tuna_c"
    config["training"] = {**config["training"], "save_steps": 1}
    config["stages"] = {"contextual": config["stages"]["contextual"], "tuna_c": {"keep_checkpoints": True}}
    Pipeline(config).run(progress=False)

    # the training stage died after its first checkpoint: no model, manifest still "running"
    tuna_c = root / "resume" / "tuna_c"
    assert (tuna_c / "checkpoints" / "checkpoint-2").is_dir()
    mark_running(tuna_c)
    shutil.rmtree(tuna_c / "checkpoints" / "checkpoint-2")
    shutil.rmtree(tuna_c / "model")
    manifests = Pipeline(config).run(only=["tuna_c"], progress=False)
    assert manifests["tuna_c"]["status"] == "done" and manifests["tuna_c"]["attempts"] == 2
    assert manifests["tuna_c"]["metrics"]["global_step"] == 2
    assert manifests["tuna_c"]["metrics"]["train_runtime"] >= 0 and (tuna_c / "model" / "config.json").exists()

    # the contextual stage was killed mid-run: half its rows and a torn last line
    contextual = root / "resume" / "contextual"
    rows = (contextual / "data.jsonl").read_text().splitlines()
    assert len(rows) >= 6
    (contextual / "data.jsonl").write_text("\n".join(rows[:4]) + "\n" + rows[4][:20])
    mark_running(contextual)
    manifests = Pipeline(config).run(only=["contextual"], progress=False)
    ids = [json.loads(line)["id"] for line in (contextual / "data.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) and set(ids) == {json.loads(line)["id"] for line in rows}
    assert manifests["contextual"]["attempts"] == 2
    # tuna_c was trained on the data before it was redone: a full rerun says so instead of skipping it
    with pytest.raises(PipelineError, match="--redo tuna_c"):
        Pipeline(config).run(progress=False)


def mark_running(stage_dir):
    m = json.loads((stage_dir / "manifest.json").read_text())
    m["status"] = "running"
    (stage_dir / "manifest.json").write_text(json.dumps(m))


def test_config_errors(setup):
    root, config_path = setup
    config = load_config(config_path)
    with pytest.raises(PipelineError, match="Unknown variant"):
        resolve_stages({**config, "variant": "nope"})
    with pytest.raises(PipelineError, match="unknown stage"):
        resolve_stages({**config, "stages": {"tuna_pp": {}}})
    # settings of stages another variant runs are kept for it, not an error
    assert [s.name for s in resolve_stages({**config, "variant": "tuna_c"})] == ["sft", "contextual", "tuna_c"]
    with pytest.raises(PipelineError, match="Unknown key"):
        resolve_stages({**config, "stages": {"tuna_p": {"learning_rate": 1}}})
    with pytest.raises(PipelineError, match="output_dir"):
        resolve_stages({k: v for k, v in config.items() if k != "output_dir"})
    with pytest.raises(PipelineError, match="have not finished"):
        Pipeline({**config, "output_dir": str(root / "empty")}).run(only=["tuna"], progress=False)


def test_config_values_and_overrides(tmp_path):
    from tuna_trl.pipeline import apply_override, yaml_load

    config = yaml_load("training: {learning_rate: 1e-5, warmup_ratio: 3.0e-2, max_steps: 10}\nname: 1e")
    assert config == {"training": {"learning_rate": 1e-5, "warmup_ratio": 0.03, "max_steps": 10}, "name": "1e"}
    apply_override(config, "stages.tuna.training.learning_rate=1e-6")
    apply_override(config, "data.limit=5")
    assert config["stages"]["tuna"]["training"]["learning_rate"] == 1e-6 and config["data"]["limit"] == 5
    with pytest.raises(PipelineError, match="KEY=VALUE"):
        apply_override(config, "novalue")


def test_variants_wiring(setup):
    _, config_path = setup
    config = load_config(config_path)
    config["stages"] = {}
    wiring = {
        variant: {s.name: s.needs for s in resolve_stages({**config, "variant": variant})}
        for variant in ("tuna", "tuna_p", "tuna_c", "tuna_cp", "mix")
    }
    assert wiring["tuna"] == {"sft": [], "probabilistic": [], "tuna_p": ["sft", "probabilistic"], "contextual": ["tuna_p"], "tuna": ["tuna_p", "contextual"]}
    assert wiring["tuna_c"]["contextual"] == ["sft"] and wiring["tuna_c"]["tuna_c"] == ["sft", "contextual"]
    assert wiring["tuna_cp"]["tuna_cp"] == ["tuna_c", "probabilistic"]
    assert wiring["mix"]["tuna_mix"] == ["sft", "probabilistic", "contextual"]
    tuna = resolve_stages({**config, "variant": "tuna"})[-1]
    assert tuna.settings["training"]["learning_rate"] == 1e-6  # the paper's second-stage LR by default
    config["stages"] = {"contextual": {"policy": {"batch_size": 8}}}
    for variant, policy in (("tuna", "tuna_p"), ("tuna_c", "sft"), ("mix", "sft")):
        contextual = [s for s in resolve_stages({**config, "variant": variant}) if s.name == "contextual"][0]
        assert contextual.settings["policy"] == {"model": policy, "batch_size": 8} and policy in contextual.needs


def test_demo_tasks_are_deterministic_and_checkable():
    from tuna_trl.demo_tasks import annotate, solve

    train, heldout = make_dataset(num_train=60, num_heldout=30, seed=3)
    assert all(solve(r["instruction"], r["input"]) == r["output"] for r in train + heldout)
    noisy = annotate(train, ("sort", "reverse"), echo_rate=1.0)
    assert all((n["output"] == n["input"]) == (n["task"] in ("sort", "reverse")) for n in noisy)
    assert (train, heldout) == make_dataset(num_train=60, num_heldout=30, seed=3)
    keys = {(r["instruction"], r["input"]) for r in train}
    assert not keys & {(r["instruction"], r["input"]) for r in heldout}
    import random

    rng = random.Random(0)
    for row in heldout:
        scores = [gold_match_score(c, row["output"]) for c in [row["output"], *corruptions(row, rng)]]
        assert scores == sorted(set(scores), reverse=True) and scores[0] == 2.0
