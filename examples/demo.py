"""`make demo`: Tuna end to end, offline, on a CPU, in minutes.

    HF_HUB_OFFLINE=1 python examples/demo.py [--config examples/configs/demo_pipeline.yaml] [--fresh]

1. Data: a seeded synthetic instruction set whose answers can be checked (adding and comparing numbers, reversing
   and sorting words, first letters, counting letters), split into train and held-out (`tuna_trl.demo_tasks`).
   As Alpaca's answers came from a weaker model, the SFT data's answers come from a careless annotator: right,
   except that for some tasks it often repeats the input instead of answering.
2. Models: a byte-level BPE tokenizer trained on that text, a small random Llama (the student) and a larger one
   (the teacher), built locally (`tuna_trl.tiny`). The teacher is fine-tuned on correct answers.
3. The pipeline (`tuna_trl.pipeline`): SFT -> probabilistic ranking of the teacher's samples -> Tuna_p ->
   contextual ranking of Tuna_p's own samples by a rule judge that works out the correct answer (exact match +
   ROUGE-L against it, the interface of the LLM judge) -> Tuna.
4. A fair baseline: SFT continued on the same data for as many optimizer steps as Tuna_p and Tuna took together.
5. A proxy ranking model trained on the judge's rankings, and its held-out agreement with the judge.
6. Held-out metrics of every model against the correct answers: exact match and ROUGE-L of greedy answers, and
   rank accuracy (does the model give the correct answer a higher mean log-prob than near misses?). A table and
   two plots go to `<output_dir>/results/`.

Every stage is cached in `<output_dir>`: a rerun skips what is done and redoes what the config changed. `--fresh`
starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path


logger = logging.getLogger("demo")

MODELS = [  # (name in the table, where its model is, relative to output_dir)
    ("SFT", "pipeline/sft/model"),
    ("SFT-long", "sft_long/sft/model"),
    ("Tuna_p", "pipeline/tuna_p/model"),
    ("Tuna", "pipeline/tuna/model"),
    ("teacher", "teacher/sft/model"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "demo_pipeline.yaml"))
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="Override a demo config value, e.g. --set pipeline.stages.tuna.training.learning_rate=1e-4.")
    parser.add_argument("--fresh", action="store_true", help="Delete output_dir first and run everything again.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Data and models


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)
    return str(path)


def prepare_data(cfg: dict, out: Path) -> dict:
    """The training instructions with correct answers (the teacher's data) and with the annotator's answers (the
    SFT data), the held-out rows, and held-out ranked rows (correct answer, then near misses) for rank accuracy."""
    from tuna_trl.demo_tasks import annotate, corruptions, make_dataset

    data, annotator = cfg["data"], cfg["annotator"]
    gold, heldout = make_dataset(data["num_train"], data["num_heldout"], seed=cfg["seed"], tasks=tuple(data["tasks"]))
    train = annotate(gold, tuple(annotator["echo_tasks"]), annotator["echo_rate"], seed=cfg["seed"])
    template = data["prompt_template"]
    rng = random.Random(cfg["seed"])
    ranked = [
        {"prompt": template.format(**row), "completions": [row["output"], *corruptions(row, rng)], "task": row["task"]}
        for row in heldout
    ]
    paths = {
        "gold": write_jsonl(out / "data" / "train_correct.jsonl", gold),
        "train": write_jsonl(out / "data" / "train.jsonl", train),
        "heldout": write_jsonl(out / "data" / "heldout.jsonl", heldout),
        "heldout_ranked": write_jsonl(out / "data" / "heldout_ranked.jsonl", ranked),
    }
    echoed = sum(a["output"] != g["output"] for a, g in zip(train, gold))
    logger.info(
        "data: %d training and %d held-out instructions over tasks %s; the SFT data's annotator echoed the input in "
        "%d answers (%.0f%% of %s) -> %s", len(train), len(heldout), data["tasks"], echoed,
        100 * annotator["echo_rate"], "/".join(annotator["echo_tasks"]), out / "data",
    )
    return {"train": train, "heldout": heldout, "ranked": ranked, "paths": paths}


def build_base_models(cfg: dict, out: Path, train: list[dict]) -> dict:
    """A tokenizer trained on the training text and two random Llamas, saved once under `<output_dir>/base`."""
    from tuna_trl.tiny import build_model, build_tokenizer

    paths = {"student": out / "base" / "student", "teacher": out / "base" / "teacher"}
    if all((p / "config.json").exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    template = cfg["data"]["prompt_template"]
    tokenizer = build_tokenizer([template.format(**row) + row["output"] for row in train], vocab_size=cfg["tokenizer"]["vocab_size"])
    for name, kwargs in (("student", cfg["student"]), ("teacher", cfg["teacher"]["model"])):
        model = build_model(tokenizer, seed=cfg["seed"], **kwargs)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        logger.info("%s: a random Llama with %.2fM parameters -> %s", name, model.num_parameters() / 1e6, paths[name])
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Stages


def run_pipeline(config: dict, progress: bool) -> dict:
    from tuna_trl.pipeline import Pipeline

    # the demo's output_dir is a cache: whatever the config changed is redone, the rest reused
    return Pipeline(config).run(progress=progress, redo_changed=True)


def train_teacher(cfg, out, base, data_cfg, progress) -> str:
    logger.info("teacher: the larger model fine-tuned on correct answers (it samples and ranks the probabilistic data)")
    run_pipeline(
        {
            "output_dir": str(out / "teacher"),
            "variant": "sft",
            "seed": cfg["seed"],
            "model": base["teacher"],
            "data": data_cfg,
            "stages": {"sft": {"training": cfg["teacher"]["training"]}},
        },
        progress,
    )
    return str(out / "teacher" / "sft" / "model")


def tuna_pipeline_config(cfg, out, base, data_cfg, teacher) -> dict:
    import copy

    config = copy.deepcopy(cfg["pipeline"])
    config.update(output_dir=str(out / "pipeline"), model=base["student"], data=data_cfg, seed=cfg["seed"])
    config["stages"]["probabilistic"]["teacher"]["model"] = teacher
    return config


def train_sft_long(cfg, out, pipeline_config, manifests, data_cfg, progress) -> int:
    """SFT continued from the SFT model, on the same SFT data, for as many optimizer steps as Tuna_p + Tuna took, at
    Tuna_p's learning rate: what the extra steps alone are worth."""
    steps = sum(manifests[name]["metrics"]["global_step"] for name in ("tuna_p", "tuna"))
    tuna_p = pipeline_config["stages"]["tuna_p"]["training"]
    training = {k: v for k, v in tuna_p.items() if k in ("learning_rate", "warmup_steps")}
    training["max_steps"] = steps
    logger.info("SFT-long: the SFT model trained %d more steps on the reference answers (as many as Tuna_p + Tuna)", steps)
    run_pipeline(
        {
            "output_dir": str(out / "sft_long"),
            "variant": "sft",
            "seed": cfg["seed"],
            "model": str(out / "pipeline" / "sft" / "model"),
            "data": data_cfg,
            "training": pipeline_config.get("training", {}),
            "stages": {"sft": {"training": training}},
        },
        progress,
    )
    return steps


def train_demo_prm(cfg, out, progress) -> dict | None:
    """A proxy ranking model on the contextual stage's judge-ranked rows (10% held out): how well a scalar model
    learns the judge's ranking, measured as held-out pairwise agreement."""
    from tuna_trl.prm import PRMConfig, train_prm

    settings = cfg.get("prm") or {}
    if not settings.get("enabled", True):
        return None
    path = out / "prm"
    contextual = json.loads((out / "pipeline" / "contextual" / "manifest.json").read_text())["run_id"]
    done = path / "prm_metrics.json"
    if done.exists() and (path / "contextual_run_id").exists() and (path / "contextual_run_id").read_text() == contextual:
        return json.loads(done.read_text())
    logger.info("PRM: a scalar ranking model trained on the judge's rankings of the contextual data")
    args = PRMConfig(
        output_dir=str(path), learning_rate=settings.get("learning_rate", 1e-3),
        num_train_epochs=settings.get("num_train_epochs", 1), per_device_train_batch_size=32,
        per_device_eval_batch_size=64, save_strategy="no", logging_steps=1000, seed=cfg["seed"], use_cpu=True,
        disable_tqdm=not progress,
    )
    model = str(out / "pipeline" / "sft" / "model")
    metrics = train_prm(model, [str(out / "pipeline" / "contextual" / "data.jsonl")], args, eval_fraction=0.1)
    (path / "contextual_run_id").write_text(contextual)
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_model(path: str, heldout: list[dict], ranked: list[dict], cfg: dict, progress: bool) -> dict:
    """Held-out exact match and ROUGE-L (x100) of greedy answers, overall and per task, and rank accuracy (x100)."""
    import tempfile

    from datasets import Dataset

    from tuna_trl import TunaConfig, TunaRankTrainer
    from tuna_trl.evaluation import generate_answers, load_causal_lm, score_predictions

    model, tokenizer = load_causal_lm(path, device="cpu")
    prompts = [cfg["data"]["prompt_template"].format(**row) for row in heldout]
    answers = generate_answers(model, tokenizer, prompts, batch_size=cfg["eval"]["batch_size"],
                               max_new_tokens=cfg["eval"]["max_new_tokens"], progress=progress)
    records = [{"task": row["task"], "prediction": answer, "references": [row["output"]]} for row, answer in zip(heldout, answers)]
    scores = score_predictions(records)
    with tempfile.TemporaryDirectory() as tmp:
        args = TunaConfig(output_dir=tmp, per_device_eval_batch_size=64, report_to="none", use_cpu=True, disable_tqdm=True)
        rows = Dataset.from_list([{"prompt": r["prompt"], "completions": r["completions"]} for r in ranked])
        trainer = TunaRankTrainer(model=model, args=args, eval_dataset=rows, processing_class=tokenizer)
        rank = trainer.evaluate()
    return {
        "exact_match": scores["exact_match"],
        "rougeL": scores["rougeL"],
        "rank_accuracy": 100.0 * rank["eval_rank_accuracy"],
        "tasks": {task: {"exact_match": s["exact_match"], "rougeL": s["rougeL"]} for task, s in scores["tasks"].items()},
        "examples": [{"prompt": p, "answer": a, "gold": r["output"]} for p, a, r in list(zip(prompts, answers, heldout))[:5]],
    }


def grouped_bars(values: dict[str, list[float]], groups: list[str], ylabel: str, title: str, path: Path) -> str:
    """A PNG of one bar per model in each group; `values[model][i]` is the model's value in group i."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    colors = ["tab:gray", "tab:olive", "tab:blue", "tab:red", "tab:green"]
    width = 0.8 / len(values)
    fig, ax = plt.subplots(figsize=(1.5 * len(groups) + 3.5, 4.5), dpi=110)
    for k, (name, ys) in enumerate(values.items()):
        bars = ax.bar([i + k * width for i in range(len(groups))], ys, width, label=name, color=colors[k % len(colors)])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([i + width * (len(values) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=len(values), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_results(results: dict, path: Path) -> list[str]:
    metrics = {"exact_match": "exact match", "rougeL": "ROUGE-L", "rank_accuracy": "rank accuracy"}
    tasks = sorted(next(iter(results.values()))["tasks"])
    return [
        grouped_bars({name: [r[m] for m in metrics] for name, r in results.items()}, list(metrics.values()),
                     "held-out score (x100)", "Tuna demo: held-out metrics", path / "metrics.png"),
        grouped_bars({name: [r["tasks"][t]["exact_match"] for t in tasks] for name, r in results.items()}, tasks,
                     "held-out exact match (x100)", "Exact match by task", path / "exact_match_by_task.png"),
    ]


def report(results: dict, steps: dict, out: Path, wall_seconds: float, prm: dict | None) -> str:
    from tuna_trl.evaluation import markdown_table, write_report

    headers = ["model", "exact match", "ROUGE-L", "rank accuracy", "train steps"]
    rows = [[name, r["exact_match"], r["rougeL"], r["rank_accuracy"], steps.get(name)] for name, r in results.items()]
    tasks = sorted(next(iter(results.values()))["tasks"])
    task_rows = [[name, *(r["tasks"][t]["exact_match"] for t in tasks)] for name, r in results.items()]
    markdown = "\n".join([
        "# Tuna demo: held-out results",
        "",
        markdown_table(headers, rows, digits=1),
        "",
        "Exact match and ROUGE-L of greedy answers, and rank accuracy (the gold answer's mean log-prob above each near "
        "miss's), on held-out instructions, x100. Train steps: optimizer steps after the random initialisation.",
        "",
        "## Exact match by task",
        "",
        markdown_table(["model", *tasks], task_rows, digits=1),
        "",
        *([
            "",
            f"PRM: held-out pairwise agreement with the judge {100 * prm['eval_agreement']:.1f} (before training "
            f"{100 * prm['initial_eval_agreement']:.1f}, chance 50) on {prm['eval_rows']} held-out contextual rows.",
        ] if prm and "eval_agreement" in prm else []),
        "",
        f"Wall time: {wall_seconds / 60:.1f} min.",
    ])
    write_report(out / "results", "results", {"models": results, "train_steps": steps, "prm": prm, "wall_seconds": wall_seconds}, markdown)
    return markdown


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "datasets", "transformers.modeling_utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from tuna_trl.pipeline import apply_override, yaml_load

    with open(args.config, encoding="utf-8") as f:
        cfg = yaml_load(f)
    for override in args.overrides:
        apply_override(cfg, override)
    out = Path(cfg["output_dir"])
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import set_seed

    torch.set_num_threads(cfg.get("threads", 1))
    set_seed(cfg["seed"])
    progress = not args.no_progress

    data = prepare_data(cfg, out)
    base = build_base_models(cfg, out, data["train"])
    data_cfg = {"path": data["paths"]["train"], "prompt_template": cfg["data"]["prompt_template"]}
    teacher = train_teacher(cfg, out, base, {**data_cfg, "path": data["paths"]["gold"]}, progress)
    pipeline_config = tuna_pipeline_config(cfg, out, base, data_cfg, teacher)
    logger.info("pipeline: %s", " -> ".join(["sft", "probabilistic", "tuna_p", "contextual", "tuna"]))
    manifests = run_pipeline(pipeline_config, progress)
    steps = {name: manifests[stage]["metrics"]["global_step"] for name, stage in (("SFT", "sft"),)}
    steps["Tuna_p"] = steps["SFT"] + manifests["tuna_p"]["metrics"]["global_step"]
    steps["Tuna"] = steps["Tuna_p"] + manifests["tuna"]["metrics"]["global_step"]
    models = [m for m in MODELS if m[0] != "SFT-long" or cfg.get("sft_long", {}).get("enabled", True)]
    if any(name == "SFT-long" for name, _ in models):
        steps["SFT-long"] = steps["SFT"] + train_sft_long(cfg, out, pipeline_config, manifests, data_cfg, progress)

    prm = train_demo_prm(cfg, out, progress)
    if prm and "eval_agreement" in prm:
        logger.info("PRM: held-out pairwise agreement with the judge %.3f (before training %.3f)", prm["eval_agreement"], prm["initial_eval_agreement"])

    logger.info("evaluation: greedy answers and rank accuracy on %d held-out instructions", len(data["heldout"]))
    results = {}
    for name, path in models:
        results[name] = evaluate_model(str(out / path), data["heldout"], data["ranked"], cfg, progress)
        logger.info("%s: exact match %.1f, ROUGE-L %.1f, rank accuracy %.1f", name, results[name]["exact_match"],
                    results[name]["rougeL"], results[name]["rank_accuracy"])
    steps["teacher"] = json.loads((out / "teacher" / "sft" / "manifest.json").read_text())["metrics"]["global_step"]
    wall = time.monotonic() - started
    (out / "results").mkdir(parents=True, exist_ok=True)
    plots = plot_results(results, out / "results")
    markdown = report(results, steps, out, wall, prm)
    print("\n" + markdown + "\n")
    print(f"Saved {out / 'results' / 'results.md'}, results.json and {', '.join(os.path.basename(p) for p in plots)}.")
    baseline = max(results["SFT"]["exact_match"], results.get("SFT-long", results["SFT"])["exact_match"])
    verdict = "beats" if results["Tuna"]["exact_match"] > baseline else "does NOT beat"
    print(f"Tuna {verdict} the best SFT baseline on held-out exact match: {results['Tuna']['exact_match']:.1f} vs {baseline:.1f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
