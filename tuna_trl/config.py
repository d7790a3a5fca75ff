"""`TunaConfig`: the training arguments of `TunaRankTrainer` (paper defaults where the paper gives one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .loss import REDUCTIONS


MLE_TARGETS = ("reference", "best", "all")


@dataclass
class TunaConfig(TrainingArguments):
    """Configuration of [`TunaRankTrainer`]. Every `transformers.TrainingArguments` field works as usual; the fields
    below are Tuna's. Defaults follow the paper (LLaMA-7B, Tuna_p): LR 1e-5, 1 epoch, 2 warm-up steps, margin 0.1,
    lambda 1.0.
    """

    # Tuna loss
    margin: float = field(
        default=0.1,
        metadata={"help": "Margin m of the ranking hinge per rank step: pair (j, k) pays relu(v_k - v_j + m*(k-j))."},
    )
    mle_weight: float = field(
        default=1.0,
        metadata={"help": "Weight lambda of the NLL term added to the ranking loss (0 disables it)."},
    )
    rank_loss_reduction: str = field(
        default="sum",
        metadata={
            "help": "How pair hinges are reduced: 'sum' (paper: sum over pairs per example, mean over examples) or "
            "'gap_mean' (paper's released code: mean over pairs at each rank gap, summed over gaps).",
            "choices": list(REDUCTIONS),
        },
    )
    mle_target: str = field(
        default="reference",
        metadata={
            "help": "Which tokens the NLL term is computed on: 'reference' (the row's `reference`, or its best "
            "completion when it has none), 'best' (the best-ranked completion) or 'all' (every completion, like "
            "the paper's released code).",
            "choices": list(MLE_TARGETS),
        },
    )
    length_normalize: bool = field(
        default=True,
        metadata={"help": "Score v of a completion = mean token log-prob (True, paper) or summed log-prob (False)."},
    )
    # Tokenization
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum tokens of prompt + one completion; completions are truncated on the right to fit. A "
            "row whose completion would be left with no token is dropped (with a warning). None: no limit."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Maximum prompt tokens; longer prompts keep their last tokens. None: no limit."},
    )
    max_completions: int | None = field(
        default=None,
        metadata={"help": "Keep only the top-k ranked completions of each row. None: keep all."},
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the dataset (`datasets.Dataset.map`)."}
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of `AutoModelForCausalLM.from_pretrained` when `model` is a name or path "
            "(e.g. '{\"dtype\": \"bfloat16\", \"attn_implementation\": \"sdpa\"}')."
        },
    )
    # Batch layout and log-prob computation
    padding_free: bool | None = field(
        default=None,
        metadata={
            "help": "Pack each example's prompt once with its N completions in one row (prefix sharing, a block "
            "attention mask) instead of one padded row per (prompt, completion). None: on when the model's "
            "attention supports it."
        },
    )
    logps_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Target tokens whose log-softmax is computed at once; bounds the float32 (tokens x vocab) "
            "memory of the log-prob step."
        },
    )

    # Paper defaults for fields TrainingArguments already has
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial AdamW learning rate (paper: 1e-5)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs (paper: 1)."})
    warmup_steps: float = field(default=2, metadata={"help": "Linear warm-up steps (paper: 2)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimizer steps."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: the trainer selects its own tokenized columns."},
    )

    def __post_init__(self):
        if self.rank_loss_reduction not in REDUCTIONS:
            raise ValueError(f"rank_loss_reduction must be one of {REDUCTIONS}, got {self.rank_loss_reduction!r}.")
        if self.mle_target not in MLE_TARGETS:
            raise ValueError(f"mle_target must be one of {MLE_TARGETS}, got {self.mle_target!r}.")
        if self.max_completions is not None and self.max_completions < 1:
            raise ValueError(f"max_completions must be >= 1 or None, got {self.max_completions}.")
        if isinstance(self.model_init_kwargs, str):
            import json

            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        super().__post_init__()
