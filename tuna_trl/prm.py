"""Proxy ranking model (PRM): a scalar reward-style model trained to order completions like the judge did.

Judging every sample with a large LLM is the expensive part of contextual ranking. A PRM is an
`AutoModelForSequenceClassification` with one output (`num_labels=1`) whose score s(prompt, completion) is trained
with the Tuna ranking loss (`tuna_trl.loss.ranking_loss`) on the judge-ranked rows, s taking the place of the
log-prob v:

    L(b) = sum_{j < k < n_b} max(0, s_k - s_j + margin * (k - j))

It can then re-rank new rows (`tuna-trl prm rerank`) or stand in for the judge of a contextual stage
(`PRMJudge`, `judge: {type: prm, path: ...}` in a pipeline config). Its quality is its held-out pairwise agreement
with the judge: the fraction of pairs (j better than k for the judge) with s_j > s_k.

The text scored is exactly what `TunaRankTrainer` scores: prompt ids (with the tokenizer's special tokens) +
completion ids + EOS; the score is read at the last token that is not padding.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Data


def tokenize_ranked(dataset, tokenizer, args, name: str = "train"):
    """Ranked rows (`prompt`, `completions` best first, optional `scores`) -> `prompt_ids`, `completion_ids`,
    `judge_scores` (the row's judge scores aligned with the completions, NaN where unknown)."""
    from .tokenization import tokenize_row, truncate_row

    def process(row, index):
        ids = tokenize_row({"prompt": row["prompt"], "completions": row["completions"]}, tokenizer, index)
        ids = truncate_row(ids, args.max_length, args.max_prompt_length, args.max_completions)
        scores = row.get("scores") or []
        n = len(ids["completion_ids"])
        judge_scores = [float(s) if isinstance(s, (int, float)) else math.nan for s in scores[:n]]
        judge_scores += [math.nan] * (n - len(judge_scores))
        return {"prompt_ids": ids["prompt_ids"], "completion_ids": ids["completion_ids"], "judge_scores": judge_scores, "keep": ids["keep"]}

    columns = dataset.column_names
    dataset = dataset.map(process, with_indices=True, remove_columns=columns, num_proc=args.dataset_num_proc, desc=f"Tokenizing {name} rows")
    before = len(dataset)
    dataset = dataset.filter(lambda keep: keep, input_columns="keep").remove_columns("keep")
    if len(dataset) < before:
        logger.warning("Dropped %d of %d %s rows: max_length leaves no room for a completion.", before - len(dataset), before, name)
    return dataset


@dataclass
class PRMCollator:
    """Tokenized ranked rows -> one right-padded sequence per (prompt, completion) and the (B, N) layout.

    Output: `input_ids`, `attention_mask` (S, T); `score_index` (B, N) long, the sequence holding completion k of
    example b (-1 past `num_completions`); `num_completions` (B,); `judge_scores` (B, N) float, NaN where unknown.

    >>> batch = PRMCollator(pad_token_id=0)([{"prompt_ids": [1, 5], "completion_ids": [[7, 2], [8, 9, 2]]}])
    >>> batch["input_ids"]
    tensor([[1, 5, 7, 2, 0],
            [1, 5, 8, 9, 2]])
    >>> batch["score_index"]
    tensor([[0, 1]])
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        import torch

        sequences, index = [], []
        for feature in features:
            row = []
            for completion in feature["completion_ids"]:
                row.append(len(sequences))
                sequences.append(list(feature["prompt_ids"]) + list(completion))
            index.append(row)
        width = max(len(s) for s in sequences)
        num = max(len(r) for r in index)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention_mask[i, : len(seq)] = 1
        score_index = torch.full((len(features), num), -1, dtype=torch.long)
        judge_scores = torch.full((len(features), num), math.nan)
        for b, (row, feature) in enumerate(zip(index, features)):
            score_index[b, : len(row)] = torch.tensor(row)
            given = feature.get("judge_scores") or []
            if given:
                judge_scores[b, : len(given)] = torch.tensor(given, dtype=torch.float)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "score_index": score_index,
            "num_completions": torch.tensor([len(r) for r in index]),
            "judge_scores": judge_scores,
        }


# ----------------------------------------------------------------------------------------------------------------------
# Model and trainer


def load_prm(model_or_path, tokenizer=None, model_init_kwargs: dict | None = None):
    """`(model, tokenizer)`: a one-output `AutoModelForSequenceClassification` from a PRM directory, or from a causal
    LM checkpoint (the scalar head is then new). The model's pad token is set, since the score is read at the last
    non-padding token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_or_path if isinstance(model_or_path, str) else model_or_path.config.name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if isinstance(model_or_path, str):
        model = AutoModelForSequenceClassification.from_pretrained(model_or_path, num_labels=1, **(model_init_kwargs or {}))
    else:
        model = model_or_path
    if model.config.num_labels != 1:
        raise ValueError(f"A PRM has one output (num_labels=1); {model_or_path} has {model.config.num_labels}.")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def pair_agreement(scores, num_completions, judge_scores=None):
    """(agreeing pairs, pairs) of a (B, N) score matrix whose columns are in the judge's order, best first.

    A pair j < k < n_b agrees when scores[b, j] > scores[b, k]. With `judge_scores`, pairs the judge scored equal
    are left out (NaN scores count as distinct).
    """
    import torch

    ranks = torch.arange(scores.shape[1], device=scores.device)
    valid = ranks[None, :] < num_completions[:, None]
    pairs = (ranks[:, None] < ranks[None, :])[None] & valid[:, None, :]
    if judge_scores is not None:
        pairs = pairs & ~(judge_scores[:, :, None] == judge_scores[:, None, :])
    agree = (scores[:, :, None] > scores[:, None, :]) & pairs
    return int(agree.sum()), int(pairs.sum())


def _define_training_classes() -> None:
    """Define `PRMConfig` and `PRMTrainer`. They subclass transformers classes, whose import takes seconds, and the
    `tuna-trl` command line imports this module for its parser: so they are built on first use (module
    `__getattr__` below), not at import."""
    global PRMConfig, PRMTrainer
    import torch
    from transformers import Trainer, TrainingArguments

    from .loss import ranking_loss

    @dataclass
    class PRMConfig(TrainingArguments):
        """Training arguments of [`PRMTrainer`]: every `transformers.TrainingArguments` field, plus the ranking loss's."""

        margin: float = field(
            default=1.0,
            metadata={
                "help": "Margin per rank step of the hinge on the scalar scores. Scores are free-scale logits (not "
                "log-probs as in Tuna), so the default is the usual pairwise-hinge margin of 1."
            },
        )
        rank_loss_reduction: str = field(
            default="sum",
            metadata={"help": "'sum' (per example, sum over pairs; mean over examples) or 'gap_mean', as in TunaConfig."},
        )
        max_length: int | None = field(default=1024, metadata={"help": "Maximum tokens of prompt + one completion."})
        max_prompt_length: int | None = field(default=None, metadata={"help": "Maximum prompt tokens (keeps the end)."})
        max_completions: int | None = field(default=None, metadata={"help": "Keep only the top-k ranked completions."})
        dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes used to tokenize the data."})
        model_init_kwargs: dict[str, Any] | None = field(
            default=None,
            metadata={"help": "Keyword arguments of `AutoModelForSequenceClassification.from_pretrained`."},
        )
        learning_rate: float = field(default=1e-5, metadata={"help": "Initial AdamW learning rate."})
        num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
        logging_steps: float = field(default=10, metadata={"help": "Log every this many optimizer steps."})
        remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs every column."})
        report_to: Any = field(default="none", metadata={"help": "Integrations to report to (default: none)."})

    class PRMTrainer(Trainer):
        """A `transformers.Trainer` whose loss is `ranking_loss` of the PRM's scalar scores (B, N).

        Logs `agreement` (pairwise agreement with the judge's order, all pairs) and `agreement_strict` (pairs the
        judge scored differently), in training and evaluation.
        """

        _tag_names = ["trl", "tuna", "reward-model"]

        def __init__(self, model, args: PRMConfig, train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
            model, processing_class = load_prm(model, processing_class, args.model_init_kwargs)
            if train_dataset is not None and "prompt_ids" not in train_dataset.column_names:
                train_dataset = tokenize_ranked(train_dataset, processing_class, args, "train")
            if eval_dataset is not None and "prompt_ids" not in eval_dataset.column_names:
                eval_dataset = tokenize_ranked(eval_dataset, processing_class, args, "eval")
            self._counts = {"train": defaultdict(float), "eval": defaultdict(float)}
            kwargs.setdefault("data_collator", PRMCollator(processing_class.pad_token_id))
            super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, **kwargs)

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["prompt_ids", "completion_ids", "judge_scores"]

        def scores(self, model, inputs) -> torch.Tensor:
            """(B, N) scalar scores, column k = the judge's rank k; padded columns are 0 (masked by the loss)."""
            flat = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.squeeze(-1)
            index = inputs["score_index"]
            return torch.where(index >= 0, flat[index.clamp(min=0)], torch.zeros_like(flat[index.clamp(min=0)]))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            scores = self.scores(model, inputs)
            loss = ranking_loss(scores.float(), inputs["num_completions"], self.args.margin, self.args.rank_loss_reduction)
            with torch.no_grad():
                mode = "train" if model.training else "eval"
                counts = self._counts[mode]
                agree, pairs = pair_agreement(scores.detach(), inputs["num_completions"])
                agree_s, pairs_s = pair_agreement(scores.detach(), inputs["num_completions"], inputs["judge_scores"])
                counts["agree"] += agree
                counts["pairs"] += pairs
                counts["agree_strict"] += agree_s
                counts["pairs_strict"] += pairs_s
            return (loss, {"scores": scores.detach()}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

        def _pop(self, mode) -> dict:
            counts = self._counts[mode]
            out = {}
            if counts.get("pairs"):
                out["agreement"] = counts["agree"] / counts["pairs"]
            if counts.get("pairs_strict"):
                out["agreement_strict"] = counts["agree_strict"] / counts["pairs_strict"]
            counts.clear()
            return out

        def log(self, logs, start_time=None):
            mode = "train" if self.model.training else "eval"
            prefix = "" if mode == "train" else "eval_"
            super().log({**logs, **{prefix + k: v for k, v in self._pop(mode).items()}}, start_time)

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
            self._counts["eval"].clear()
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._pop("eval").items()})
            return output

    PRMConfig.__module__ = PRMTrainer.__module__ = __name__
    PRMConfig.__qualname__, PRMTrainer.__qualname__ = "PRMConfig", "PRMTrainer"


def __getattr__(name):
    if name in ("PRMConfig", "PRMTrainer"):
        _define_training_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Using a trained PRM


class PRMScorer:
    """Score (prompt, completion) pairs with a trained PRM, in batches, without gradients.

    >>> scorer = PRMScorer("runs/prm")                       # doctest: +SKIP
    >>> scorer.score(["2+2=", "2+2="], ["4", "5"])            # doctest: +SKIP
    [3.1, -1.2]
    """

    def __init__(self, path_or_model, tokenizer=None, batch_size: int = 16, device=None, max_length: int | None = 1024):
        import torch

        self.model, self.tokenizer = load_prm(path_or_model, tokenizer)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.collator = PRMCollator(self.tokenizer.pad_token_id)
        self.name = getattr(self.model.config, "name_or_path", None) or "prm"

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One float per (prompt, completion), higher = better."""
        import torch

        from .tokenization import tokenize_row, truncate_row

        features = []
        for prompt, completion in zip(prompts, completions):
            ids = tokenize_row({"prompt": prompt, "completions": [completion]}, self.tokenizer)
            ids = truncate_row(ids, self.max_length, None, None)
            if not ids["keep"]:
                ids["completion_ids"] = [[self.tokenizer.eos_token_id]]
                ids["prompt_ids"] = ids["prompt_ids"][-(self.max_length - 1) :]
            features.append({"prompt_ids": ids["prompt_ids"], "completion_ids": ids["completion_ids"]})
        out = []
        with torch.no_grad():
            for start in range(0, len(features), self.batch_size):
                batch = self.collator(features[start : start + self.batch_size])
                logits = self.model(
                    input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
                ).logits
                out += logits.squeeze(-1).float().tolist()
        return out

    def rank(self, prompt: str, completions: list[str]) -> tuple[list[int], list[float]]:
        """(indices best first, score of each completion in the input order)."""
        scores = self.score([prompt] * len(completions), completions)
        return sorted(range(len(completions)), key=lambda i: (-scores[i], i)), scores


class PRMJudge:
    """A judge (the interface of `tuna_trl.generation.LLMJudge`) that ranks responses by PRM score.

    Args:
        path_or_model: a PRM directory (`tuna-trl prm train --output-dir`).
        prompt_fn: `(instruction, input) -> prompt`, the prompt the policy was asked with; the PRM scores
            prompt + response. Default: the Alpaca prompt.
    """

    def __init__(self, path_or_model, prompt_fn: Callable[[str, str | None], str] | None = None, batch_size: int = 16):
        from .generation.inputs import render_prompt

        self.scorer = PRMScorer(path_or_model, batch_size=batch_size)
        self.prompt_fn = prompt_fn or (lambda instruction, input: render_prompt(instruction, input, "alpaca"))
        self.name = f"prm:{self.scorer.name}"

    def __call__(self, instruction: str, responses: list[str], input: str | None = None, reference: str | None = None):
        from .generation.judge import JudgeVerdict

        ranking, scores = self.scorer.rank(self.prompt_fn(instruction, input), responses)
        return JudgeVerdict(ranking=ranking, scores=dict(enumerate(scores)))


def rerank_file(scorer: PRMScorer, input_path: str, output_path: str, progress: bool = True) -> int:
    """Re-rank the completions of every row of `input_path` by PRM score, best first, into `output_path`.

    Rows keep their other fields; `scores` becomes the PRM scores (in the new order) and `meta.prm` records the
    PRM and the original position of each completion (`meta.prm_order`). Resumable: rows whose `id` (else line
    number) is already in the output are skipped. Returns the number of rows written.
    """
    from tqdm.auto import tqdm

    from .generation.jsonl import ResumableJsonl, id_key

    rows = []
    for number, row in _read_ranked(input_path):
        row.setdefault("id", number)
        rows.append(row)
    out = ResumableJsonl(output_path)
    written = 0
    try:
        for row in tqdm([r for r in rows if id_key(r["id"]) not in out.done], desc="reranking", unit="row", disable=not progress):
            completions = [c if isinstance(c, str) else c[0]["content"] for c in row["completions"]]
            order, scores = scorer.rank(row["prompt"], completions)
            row["completions"] = [row["completions"][i] for i in order]
            row["scores"] = [scores[i] for i in order]
            row["meta"] = {**(row.get("meta") or {}), "prm": scorer.name, "prm_order": order}
            out.write(row)
            written += 1
    finally:
        out.close()
    return written


# ----------------------------------------------------------------------------------------------------------------------
# Training entry point and command line


def _read_ranked(path: str) -> list[tuple[int, dict]]:
    """(line, row) of each ranked row of a JSON/JSONL file; a ValueError names the file and line of a bad one."""
    from .evaluation.inputs import read_rows

    rows = read_rows(path, ("prompt", "completions"))
    for line, row in rows:
        if not isinstance(row["prompt"], str) or not isinstance(row["completions"], list) or not row["completions"]:
            raise ValueError(f"{path}:{line}: a row needs a string 'prompt' and a non-empty list 'completions'.")
    return rows


def _load_rows(paths: list[str]):
    from datasets import Dataset

    rows = []
    for path in paths:
        for _, row in _read_ranked(path):
            scores = row.get("scores") if isinstance(row.get("scores"), list) else None
            rows.append({
                "prompt": row["prompt"],
                "completions": row["completions"],
                "scores": [float(s) if isinstance(s, (int, float)) else None for s in scores] if scores else None,
            })
    if not rows:
        raise ValueError(f"No rows in {paths}.")
    return Dataset.from_list(rows)


def train_prm(
    model: str,
    train_files: list[str],
    args,
    eval_files: list[str] | None = None,
    eval_fraction: float = 0.1,
) -> dict:
    """Train a PRM on judge-ranked JSONL rows and save it (with its tokenizer) to `args.output_dir`.

    The held-out set is `eval_files`, else `eval_fraction` of the rows (split with `args.seed`). Returns the metrics,
    also written to `<output_dir>/prm_metrics.json`: `eval_agreement` before (`initial_eval_agreement`) and after
    training, and the same for `agreement_strict`.
    """
    from .prm import PRMTrainer  # built on first use

    dataset = _load_rows(train_files)
    if eval_files:
        eval_dataset = _load_rows(eval_files)
    elif eval_fraction:
        split = dataset.train_test_split(test_size=eval_fraction, seed=args.seed)
        dataset, eval_dataset = split["train"], split["test"]
    else:
        eval_dataset = None
    trainer = PRMTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset)
    metrics = {"train_rows": len(dataset), "eval_rows": len(eval_dataset) if eval_dataset is not None else 0}
    if eval_dataset is not None:
        metrics.update({f"initial_{k}": v for k, v in trainer.evaluate().items() if "agreement" in k})
    result = trainer.train()
    metrics.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(args.output_dir)
    with open(os.path.join(args.output_dir, "prm_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def add_parser(subparsers) -> None:
    """Register `tuna-trl prm train` and `tuna-trl prm rerank`."""
    prm = subparsers.add_parser("prm", help="Train or use a proxy ranking model (a scalar model of the judge's ranking).")
    commands = prm.add_subparsers(dest="prm_command", metavar="COMMAND", required=True)

    parser = commands.add_parser(
        "train",
        help="Train a PRM on judge-ranked rows and report its held-out agreement with the judge.",
        description="Train AutoModelForSequenceClassification(num_labels=1) with the Tuna ranking loss on its "
        "scalar scores, so that it orders each row's completions like the judge.",
    )
    parser.add_argument("--data", nargs="+", required=True, help="Ranked JSONL file(s): prompt, completions (best first), optional scores.")
    parser.add_argument("--model", required=True, help="Starting point: a causal LM or PRM directory or Hub id (the scalar head is new for an LM).")
    parser.add_argument("--output-dir", required=True, help="Where the PRM and prm_metrics.json are saved.")
    parser.add_argument("--eval-data", nargs="+", default=None, help="Held-out ranked JSONL file(s); default: --eval-fraction of --data.")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="Share of --data held out when --eval-data is not given.")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per device per step (each row is N sequences).")
    parser.add_argument("--margin", type=float, default=1.0, help="Hinge margin per rank step on the scores.")
    parser.add_argument("--max-length", type=int, default=1024, help="Maximum tokens of prompt + completion.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--training", action="append", default=[], metavar="FIELD=VALUE",
                        help="Any other PRMConfig/TrainingArguments field, e.g. --training bf16=true (repeatable).")
    parser.set_defaults(func=_train_command)

    parser = commands.add_parser(
        "rerank",
        help="Re-rank the completions of ranked rows by PRM score.",
        description="Score each row's completions with the PRM and write the rows with completions best first; "
        "a rerun with the same output resumes.",
    )
    parser.add_argument("--prm", required=True, help="The PRM directory (from `tuna-trl prm train`).")
    parser.add_argument("--input", required=True, help="JSONL rows with prompt and completions.")
    parser.add_argument("--output", required=True, help="JSONL to write (appended to, resumable).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_rerank_command)


def _train_command(args) -> int:
    from .pipeline import yaml_load

    extra = {}
    for item in args.training:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --training {item!r}: expected FIELD=VALUE", file=sys.stderr)
            return 2
        extra[key] = yaml_load(value)
    from .prm import PRMConfig

    try:
        config = PRMConfig(
            output_dir=args.output_dir,
            learning_rate=args.learning_rate,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            margin=args.margin,
            max_length=args.max_length,
            seed=args.seed,
            **extra,
        )
    except TypeError as err:
        print(f"error: {err} (see `PRMConfig` / TrainingArguments for the fields --training takes)", file=sys.stderr)
        return 2
    try:
        metrics = train_prm(args.model, args.data, config, args.eval_data, args.eval_fraction)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "eval_agreement" in metrics:
        print(
            f"held-out pairwise agreement with the judge: {metrics['eval_agreement']:.3f} "
            f"(before training {metrics.get('initial_eval_agreement', float('nan')):.3f}; "
            f"pairs the judge scored differently: {metrics.get('eval_agreement_strict', float('nan')):.3f})"
        )
    print(f"PRM saved to {args.output_dir}")
    return 0


def _rerank_command(args) -> int:
    try:
        written = rerank_file(PRMScorer(args.prm, batch_size=args.batch_size), args.input, args.output, not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{written} rows re-ranked into {args.output}")
    return 0
