"""Ranking-data generation (Tuna Sec. 2): probabilistic ranking from a teacher's log-probs and contextual ranking
of a policy's own samples by a judge, resumable and concurrent. See docs/generation.md.

Light modules are imported eagerly; the backends (openai, torch) only when used.
"""

import importlib

from .inputs import Instruction, InputError, read_instructions, render_prompt
from .judge import (
    Judge,
    JudgeParseError,
    JudgeVerdict,
    LLMJudge,
    ScoreJudge,
    build_judge_prompt,
    default_judge_template,
    parse_judge_output,
)
from .jsonl import ResumableJsonl
from .rankers import ContextualRanker, ProbabilisticRanker, RowFailure
from .ranking import probabilistic_rank, probabilistic_score, sample_diverse, sample_diverse_many
from .rouge import rouge_l, rouge_l_matrix, rouge_tokens
from .runner import RunSummary, errors_path, estimate_cost, run_ranker
from .sample import (
    Backend,
    BackendConfigError,
    BackendError,
    MissingLogprobsError,
    Sample,
    Usage,
    track_usage,
)


_LAZY = {
    "OpenAIBackend": "tuna_trl.generation.openai_backend",
    "TransformersBackend": "tuna_trl.generation.transformers_backend",
}

__all__ = [
    "Backend",
    "BackendConfigError",
    "BackendError",
    "ContextualRanker",
    "InputError",
    "Instruction",
    "Judge",
    "JudgeParseError",
    "JudgeVerdict",
    "LLMJudge",
    "MissingLogprobsError",
    "ProbabilisticRanker",
    "ResumableJsonl",
    "RowFailure",
    "RunSummary",
    "Sample",
    "ScoreJudge",
    "Usage",
    "build_judge_prompt",
    "default_judge_template",
    "errors_path",
    "estimate_cost",
    "parse_judge_output",
    "probabilistic_rank",
    "probabilistic_score",
    "read_instructions",
    "render_prompt",
    "rouge_l",
    "rouge_l_matrix",
    "rouge_tokens",
    "run_ranker",
    "sample_diverse",
    "sample_diverse_many",
    "track_usage",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tuna_trl.generation' has no attribute {name!r}")


def __dir__():
    return __all__
