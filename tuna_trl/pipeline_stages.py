"""The four kinds of pipeline stage: `sft` (trl.SFTTrainer), `probabilistic` and `contextual` (generation's
resumable runner), and `train` (`TunaRankTrainer`). Each takes a resolved `Stage` and returns what it wrote.

Training stages write `<stage>/model` (weights + tokenizer) and resume from `<stage>/checkpoints`; generation stages
write `<stage>/data.jsonl` (ranked rows) and resume from the rows already there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .pipeline import PipelineError, Stage


logger = logging.getLogger("tuna_trl.pipeline")

MODEL_DIR = "model"
DATA_FILE = "data.jsonl"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class StageResult:
    """`outputs`: {"model" | "data": path relative to the stage directory}; `metrics`: what the manifest records."""

    outputs: dict[str, str]
    metrics: dict = field(default_factory=dict)


def describe(stage: Stage, pipeline) -> str:
    """One line saying what the stage is about to do, for the log."""
    s = stage.settings
    if stage.kind == "sft":
        return f"supervised fine-tuning of {s['model']} on the reference answers (trl.SFTTrainer)"
    if stage.kind == "probabilistic":
        teacher = (s.get("teacher") or {}).get("model", "?")
        return (
            f"sampling {s.get('n', 4)} responses per instruction from teacher {teacher} and ranking them by its "
            f"length-normalised log-likelihood (beta={s.get('beta', 1.3)})"
        )
    if stage.kind == "contextual":
        judge = s.get("judge") or {}
        return (
            f"sampling {s.get('n', 4)} diverse responses per instruction from {_describe_ref(s.get('policy'), pipeline)} and "
            f"ranking them with the {judge.get('type', 'llm')} judge {judge.get('model') or judge.get('score') or judge.get('path') or ''}".rstrip()
        )
    lr = s.get("training", {}).get("learning_rate", 1e-5)
    return (
        f"Tuna ranking training (TunaRankTrainer, lr {lr:g}) of {_describe_ref(s.get('init'), pipeline)} on "
        f"{' + '.join(_describe_ref(d, pipeline) for d in s.get('data') or [])}"
    )


def _describe_ref(ref, pipeline) -> str:
    if isinstance(ref, dict):
        ref = ref.get("model", "?")
    return f"stage {ref}" if ref in pipeline.by_name else str(ref)


def run(stage: Stage, pipeline, progress: bool = True) -> StageResult:
    runners = {"sft": run_sft, "train": run_train, "probabilistic": run_probabilistic, "contextual": run_contextual}
    return runners[stage.kind](stage, pipeline, progress)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


def _resolve(ref: str, pipeline, what: str) -> str:
    """A stage name -> that stage's output `what`; anything else is a path (or a Hub id) used as is."""
    if ref in pipeline.by_name:
        return pipeline.output_of(ref, what)
    return ref


def load_instructions(data: dict, pipeline, limit: int | None = None):
    """The `generation.Instruction`s of a `data` mapping (`path` or `dataset`/`split`, `prompt_template`, `limit`).

    `prompt_template` is `alpaca`, `none` (see `tuna_trl.generation.render_prompt`) or a format string with
    `{instruction}` and `{input}`, applied to Alpaca records (records that already have a `prompt` keep it).
    """
    from .generation.inputs import PROMPT_TEMPLATES, read_instructions

    path = data.get("path")
    if path is None:
        path = _export_dataset(data, pipeline)
    template = data.get("prompt_template", "alpaca")
    custom = template not in PROMPT_TEMPLATES
    if custom and "{instruction}" not in template:
        raise PipelineError(
            f"data.prompt_template {template!r} is neither one of {PROMPT_TEMPLATES} nor a format string with "
            "'{instruction}' (and optionally '{input}')."
        )
    limit = limit if limit is not None else data.get("limit")
    instructions = read_instructions(path, prompt_template="none" if custom else template, limit=limit)
    if custom and not _has_prompt_field(path):
        instructions = [
            dataclasses.replace(i, prompt=template.format(instruction=i.instruction, input=i.input or ""))
            for i in instructions
        ]
    return instructions


def _has_prompt_field(path: str) -> bool:
    from .evaluation.inputs import read_rows

    rows = read_rows(path)
    return bool(rows) and "prompt" in rows[0][1]


def _export_dataset(data: dict, pipeline) -> str:
    """A Hub/`datasets` dataset (`data.dataset`, `data.split`) written once as JSON Lines under `<output_dir>/data`."""
    import datasets

    name, split = data["dataset"], data.get("split", "train")
    path = pipeline.output_dir / "data" / f"{name.replace('/', '__')}-{split}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset = datasets.load_dataset(name, split=split)
        tmp = path.with_suffix(".tmp")
        dataset.to_json(str(tmp), lines=True)
        os.replace(tmp, path)
    return str(path)


def read_ranked_rows(paths: list[str]) -> list[dict]:
    """The `prompt`, `completions` and `reference` of every row of the ranked JSON/JSONL files, concatenated."""
    from .evaluation.inputs import InputError, read_rows

    rows = []
    for path in paths:
        try:
            records = read_rows(path, ("prompt", "completions"))
        except InputError as err:
            raise PipelineError(str(err)) from None
        rows += [{"prompt": r["prompt"], "completions": r["completions"], "reference": r.get("reference")} for _, r in records]
    if not rows:
        raise PipelineError(f"No ranked rows in {paths}.")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Training stages


def _training_args(config_cls, stage: Stage, defaults: dict):
    own = stage.settings.get("training") or {}
    kwargs = {"output_dir": str(stage.dir / CHECKPOINT_DIR), "report_to": "none", "save_total_limit": 1, **defaults}
    if "gradient_checkpointing" in own:  # the deprecated name of activation_checkpointing: the user's wins
        kwargs.pop("activation_checkpointing", None)
    kwargs.update(own)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise PipelineError(
            f"stages.{stage.name}.training: unknown field(s) {unknown} of {config_cls.__name__} (the top-level "
            "`training` mapping applies to every training stage)."
        )
    return config_cls(**kwargs)


def _train_and_save(trainer, stage: Stage) -> StageResult:
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = stage.dir / CHECKPOINT_DIR
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last:
        logger.info("resuming from %s", last)
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(stage.dir / MODEL_DIR))
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics["global_step"] = trainer.state.global_step
    history = [h for h in trainer.state.log_history if "loss" in h or "rank_accuracy" in h]
    if history:
        metrics["last_log"] = history[-1]
    trainer.accelerator.wait_for_everyone()  # every process has saved before the checkpoints go
    if not stage.settings.get("keep_checkpoints", False) and trainer.is_world_process_zero():
        shutil.rmtree(checkpoints, ignore_errors=True)
    return StageResult({"model": MODEL_DIR}, metrics)


def _stage_defaults() -> dict:
    import torch

    # TRL's configs default to bf16 and activation checkpointing, TunaConfig to neither: every stage gets the same
    # unless the config says otherwise (set them once in the top-level `training`)
    return {"bf16": False, "activation_checkpointing": False, "use_cpu": not torch.cuda.is_available()}


def run_sft(stage: Stage, pipeline, progress: bool = True) -> StageResult:
    """`trl.SFTTrainer` on (prompt, reference) pairs, tokenized exactly as `TunaRankTrainer` tokenizes a
    completion (prompt ids with special tokens + completion ids + EOS), with the loss on the completion only."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from .tokenization import tokenize_row

    s = stage.settings
    instructions = [i for i in load_instructions(s["data"], pipeline) if i.reference]
    if not instructions:
        raise PipelineError(f"stage {stage.name}: no instruction in {s['data']} has a reference answer (`output`).")
    model = _resolve(s["model"], pipeline, "model")
    tokenizer = AutoTokenizer.from_pretrained(model)

    def tokenize(row):
        ids = tokenize_row({"prompt": row["prompt"], "completions": [row["reference"]]}, tokenizer)
        completion = ids["completion_ids"][0]
        return {"input_ids": ids["prompt_ids"] + completion, "completion_mask": [0] * len(ids["prompt_ids"]) + [1] * len(completion)}

    dataset = Dataset.from_list([{"prompt": i.prompt, "reference": i.reference} for i in instructions])
    dataset = dataset.map(tokenize, remove_columns=["prompt", "reference"], desc="Tokenizing SFT data")
    args = _training_args(SFTConfig, stage, {**_stage_defaults(), "completion_only_loss": True, "disable_tqdm": not progress})
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = _train_and_save(trainer, stage)
    result.metrics["train_rows"] = len(dataset)
    return result


def run_train(stage: Stage, pipeline, progress: bool = True) -> StageResult:
    """`TunaRankTrainer` from `init` on the ranked rows of `data` (stage names or JSONL paths)."""
    from datasets import Dataset

    from .config import TunaConfig
    from .trainer import TunaRankTrainer

    s = stage.settings
    if not s.get("init"):
        raise PipelineError(f"stages.{stage.name}.init: which model to start from (a stage name or a path).")
    if not s.get("data"):
        raise PipelineError(f"stages.{stage.name}.data: a list of ranked data (stage names or JSONL paths).")
    model = _resolve(s["init"], pipeline, "model")
    rows = read_ranked_rows([_resolve(d, pipeline, "data") for d in s["data"]])
    args = _training_args(TunaConfig, stage, {**_stage_defaults(), "disable_tqdm": not progress})
    trainer = TunaRankTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    result = _train_and_save(trainer, stage)
    result.metrics["train_rows"] = len(rows)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Generation stages


_LOCAL_KEYS = {"model", "batch_size", "device"}
_API_KEYS = {
    "model", "base_url", "api", "concurrency", "timeout", "max_retries", "api_key_env", "backoff_initial", "backoff_max",
    "max_retry_after", "extra_body",
}


def make_backend(spec, pipeline, where: str):
    """A generation backend from a config value: a stage name or local directory (`TransformersBackend`), or a
    mapping `{model, base_url, api, concurrency, ...}` (`OpenAIBackend` when `base_url` is set or `model` is not a
    local directory; `{model, batch_size, device}` for a local one)."""
    if isinstance(spec, str):
        spec = {"model": spec}
    if not isinstance(spec, dict) or not spec.get("model"):
        raise PipelineError(f"{where}: expected a stage name, a model directory or a mapping with `model`, got {spec!r}.")
    model = _resolve(spec["model"], pipeline, "model")
    if spec.get("base_url") is None and os.path.isdir(model):
        bad = set(spec) - _LOCAL_KEYS
        if bad:
            raise PipelineError(f"{where}: {sorted(bad)} do not apply to a local model; it takes {sorted(_LOCAL_KEYS)}.")
        from .generation.transformers_backend import TransformersBackend

        return TransformersBackend(model, batch_size=spec.get("batch_size", 32), device=spec.get("device"))
    bad = set(spec) - _API_KEYS
    if bad:
        raise PipelineError(f"{where}: unknown key(s) {sorted(bad)} for an API model; it takes {sorted(_API_KEYS)}.")
    from .generation.openai_backend import OpenAIBackend

    kwargs = {k: v for k, v in spec.items() if k not in ("model", "concurrency")}
    return OpenAIBackend(model, max_concurrency=spec.get("concurrency", 16), **kwargs)


# Rule judges by name: `score(response, reference) -> float`, higher is better
def _rule_scores():
    from .demo_tasks import gold_match_score
    from .generation.rouge import rouge_l

    return {
        "exact_match_rouge_l": gold_match_score,
        "rouge_l": lambda response, reference: rouge_l(reference or "", response),
    }


class SolvingJudge:
    """A rule judge that scores responses against an answer it works out itself from the instruction and input, as
    the LLM judge writes its own reference answer, rather than against the row's reference."""

    def __init__(self, judge, solve, name: str):
        self.judge, self.solve, self.name = judge, solve, name

    def __call__(self, instruction: str, responses: list[str], input: str | None = None, reference: str | None = None):
        return self.judge(instruction, responses, input=input, reference=self.solve(instruction, input))


class OneResponsePerScore:
    """Keep, of the responses a judge scored equally, only the best-ranked one.

    The ranking loss orders every pair of completions by position, so responses a rule scores the same (every
    wrong number scores 0 under exact match + ROUGE-L) would be ordered at random; an LLM judge is likewise told to
    leave duplicates out. Rows keep a strict ranking.
    """

    def __init__(self, judge):
        self.judge, self.name = judge, judge.name

    def __call__(self, instruction: str, responses: list[str], input: str | None = None, reference: str | None = None):
        verdict = self.judge(instruction, responses, input=input, reference=reference)
        seen, ranking = set(), []
        for index in verdict.ranking:
            score = verdict.scores.get(index)
            if score is not None and score in seen:
                continue
            seen.add(score)
            ranking.append(index)
        verdict.ranking = ranking
        return verdict


def make_judge(spec: dict, pipeline, where: str):
    """A judge from `{type: llm, model, base_url, ...}`, `{type: rule, score: exact_match_rouge_l | rouge_l,
    answers: reference | demo_tasks, ties: first | keep}` or `{type: prm, path}` (a proxy ranking model from
    `tuna-trl prm train`)."""
    if not isinstance(spec, dict):
        raise PipelineError(f"{where}: expected a mapping with `type` (llm, rule or prm), got {spec!r}.")
    spec = dict(spec)
    kind = spec.pop("type", "llm")
    if kind == "rule":
        from .generation.judge import ScoreJudge

        scores = _rule_scores()
        name = spec.get("score", "exact_match_rouge_l")
        if name not in scores:
            raise PipelineError(f"{where}.score: unknown rule {name!r}; choose one of {sorted(scores)}.")
        judge = ScoreJudge(scores[name], name=name)
        answers = spec.get("answers", "reference")
        if answers == "demo_tasks":  # the demo's tasks can be solved exactly: the judge knows better than the data
            from .demo_tasks import solve

            judge = SolvingJudge(judge, solve, name=f"{name} vs demo_tasks.solve")
        elif answers != "reference":
            raise PipelineError(f"{where}.answers: {answers!r}; choose 'reference' (the rows' output) or 'demo_tasks'.")
        ties = spec.get("ties", "first")
        if ties not in ("first", "keep"):
            raise PipelineError(f"{where}.ties: {ties!r}; choose 'first' (one response per score) or 'keep'.")
        return OneResponsePerScore(judge) if ties == "first" else judge
    if kind == "prm":
        from .prm import PRMJudge

        if not spec.get("path"):
            raise PipelineError(f"{where}.path: the directory of a model trained with `tuna-trl prm train`.")
        return PRMJudge(_resolve(spec["path"], pipeline, "model"), batch_size=spec.get("batch_size", 16))
    if kind == "llm":
        from .generation.judge import LLMJudge

        template = None
        if spec.get("template"):
            with open(spec.pop("template"), encoding="utf-8") as f:
                template = f.read()
        max_new_tokens = spec.pop("max_new_tokens", 2048)
        spec.setdefault("api", "chat")
        return LLMJudge(make_backend(spec, pipeline, where), template=template, max_new_tokens=max_new_tokens)
    raise PipelineError(f"{where}.type: {kind!r} is not a judge type; choose llm, rule or prm.")


def _run_generation(stage: Stage, pipeline, ranker, backend, progress: bool) -> StageResult:
    from .generation.runner import run_ranker
    from .generation.transformers_backend import TransformersBackend

    from transformers import set_seed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PipelineError(
            f"stage {stage.name} generates data and runs in one process; start it with `tuna-trl stage {stage.name}` "
            "rather than under accelerate/torchrun (a local model uses the first GPU)."
        )
    s = stage.settings
    instructions = load_instructions(s["data"], pipeline, limit=s.get("limit"))
    set_seed(s.get("seed", 42))  # local models sample with torch's generator: same seed, same rows
    if isinstance(backend, TransformersBackend):  # a local model: fill its batch with whole instructions
        workers, chunk_size = 1, max(1, backend.batch_size // s.get("n", 4))
    else:  # an API: many one-instruction requests in flight
        workers, chunk_size = getattr(backend, "max_concurrency", 16), 1
    output = stage.dir / DATA_FILE
    summary = run_ranker(
        instructions,
        str(output),
        ranker,
        workers=workers,
        chunk_size=chunk_size,
        price_per_1k=s.get("price_per_1k_tokens"),
        completion_price_per_1k=s.get("completion_price_per_1k_tokens"),
        progress=progress,
        description=stage.name,
    )
    logger.info("%s", summary.format().replace("\n", "; "))
    errors = _count_lines(summary.errors_file)
    done = _count_lines(str(output))
    allowed = s.get("max_error_fraction", 0.01)
    if errors > allowed * len(instructions):
        raise PipelineError(
            f"stage {stage.name}: {errors} of {len(instructions)} rows failed (see {summary.errors_file}), more than "
            f"max_error_fraction={allowed}. Rerun to retry them (the rows already written are kept)."
        )
    metrics = {"rows": done, "errors": errors, "prompt_tokens": summary.prompt_tokens, "completion_tokens": summary.completion_tokens}
    return StageResult({"data": DATA_FILE}, metrics)


def _count_lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def run_probabilistic(stage: Stage, pipeline, progress: bool = True) -> StageResult:
    """A teacher's samples ranked by the teacher's own log-probs (`ProbabilisticRanker`)."""
    from .generation.rankers import ProbabilisticRanker

    s = stage.settings
    if not s.get("teacher"):
        raise PipelineError(f"stages.{stage.name}.teacher: the teacher model (a local directory, or {{model, base_url}}).")
    teacher = make_backend(s["teacher"], pipeline, f"stages.{stage.name}.teacher")
    ranker = ProbabilisticRanker(
        teacher, n=s.get("n", 4), temperature=s.get("temperature", 1.0), max_new_tokens=s.get("max_new_tokens", 256), beta=s.get("beta", 1.3)
    )
    return _run_generation(stage, pipeline, ranker, teacher, progress)


def run_contextual(stage: Stage, pipeline, progress: bool = True) -> StageResult:
    """The policy's own diverse samples ranked by a judge (`ContextualRanker`)."""
    from .generation.rankers import ContextualRanker

    s = stage.settings
    if not s.get("judge"):
        raise PipelineError(f"stages.{stage.name}.judge: e.g. {{type: llm, model: gpt-4}} or {{type: rule}}.")
    policy = make_backend(s["policy"], pipeline, f"stages.{stage.name}.policy")
    judge = make_judge(s["judge"], pipeline, f"stages.{stage.name}.judge")
    ranker = ContextualRanker(
        policy,
        judge,
        n=s.get("n", 4),
        temperature=s.get("temperature", 1.0),
        tau=s.get("tau", 0.8),
        temperature_step=s.get("temperature_step", 0.1),
        max_trials=s.get("max_trials", 3),
        max_new_tokens=s.get("max_new_tokens", 256),
        judge_workers=s.get("judge_workers", 16 if s["judge"].get("type", "llm") == "llm" else 1),
    )
    return _run_generation(stage, pipeline, ranker, policy, progress)
