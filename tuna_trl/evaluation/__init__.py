"""Evaluation as in the Tuna paper: Super-NaturalInstructions ROUGE-L (0/2-shot), pairwise LLM judging in both
orders, and response-length bias. See docs/evaluation.md.

Names are imported lazily, so `tuna-trl --help` does not load torch.
"""

import importlib


_LAZY = {
    # superni.py: Super NI tasks, prompts and ROUGE-L
    "SuperNITask": "superni",
    "SuperNIInstance": "superni",
    "load_superni_task": "superni",
    "load_superni_tasks": "superni",
    "shipped_task_dir": "superni",
    "build_superni_prompt": "superni",
    "rouge_l_max": "superni",
    "exact_match": "superni",
    "score_predictions": "superni",
    "evaluate_superni": "superni",
    "superni_markdown": "superni",
    # generate.py: batched greedy answers of local models
    "generate_answers": "generate",
    "format_prompt": "generate",
    "load_causal_lm": "generate",
    # pairwise.py: judge A vs B in both orders
    "PAIRWISE_JUDGE_PROMPT": "pairwise",
    "PairwiseJudge": "pairwise",
    "build_pairwise_prompt": "pairwise",
    "parse_pairwise_verdict": "pairwise",
    "combine_verdicts": "pairwise",
    "judge_pairwise": "pairwise",
    "pairwise_summary": "pairwise",
    "pairwise_markdown": "pairwise",
    # lengths.py: length bias
    "length_by_rank": "lengths",
    "length_bias": "lengths",
    "length_bias_markdown": "lengths",
    "plot_length_bias": "lengths",
    "read_ranked_completions": "lengths",
    # inputs.py and report.py
    "load_questions": "inputs",
    "load_answers": "inputs",
    "markdown_table": "report",
    "write_report": "report",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
