"""Length bias: are better-ranked responses longer? (The paper found that GPT-4 rankings favour longer answers, and
that models trained on them learn to answer at greater length.)

Measures the mean response length at each rank position of a ranked data file (rows `prompt` and `completions`,
best first) and, for comparison, the mean length of models' outputs (answer files).
"""

from __future__ import annotations

import logging
import os
from statistics import mean

from ..generation.inputs import InputError
from .inputs import completion_text, load_answers, read_rows


logger = logging.getLogger(__name__)


def _length(text: str, tokenizer) -> dict:
    length = {"words": len(text.split())}
    if tokenizer is not None:
        length["tokens"] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return length


def _means(lengths: list[dict]) -> dict:
    stats = {"count": len(lengths), "words_mean": float(mean(x["words"] for x in lengths)) if lengths else None}
    if lengths and "tokens" in lengths[0]:
        stats["tokens_mean"] = float(mean(x["tokens"] for x in lengths))
    return stats


def length_by_rank(rows: list[list[str]], tokenizer=None) -> dict:
    """Mean length at each rank position, and how often the better-ranked response of a pair is the longer one.

    Args:
        rows: per example, its completions best first (rows may have different numbers of completions).
        tokenizer: when given, lengths are also counted in its tokens (without special tokens).

    Returns:
        `{"positions": [{"rank": k, "count", "words_mean", "tokens_mean"?}, ...] (rank 0 = best),
        "pairs": ordered pairs (j better than k) compared, "longer_preferred": share of them where the better one
        has more words, "shorter_preferred": share where it has fewer (equal lengths count in neither)}`.
    """
    lengths = [[_length(text, tokenizer) for text in completions] for completions in rows]
    depth = max((len(row) for row in lengths), default=0)
    positions = [{"rank": k, **_means([row[k] for row in lengths if len(row) > k])} for k in range(depth)]
    longer = shorter = pairs = 0
    for row in lengths:
        for j in range(len(row)):
            for k in range(j + 1, len(row)):
                pairs += 1
                longer += row[j]["words"] > row[k]["words"]
                shorter += row[j]["words"] < row[k]["words"]
    return {
        "positions": positions,
        "pairs": pairs,
        "longer_preferred": longer / pairs if pairs else None,
        "shorter_preferred": shorter / pairs if pairs else None,
    }


def read_ranked_completions(path: str) -> list[list[str]]:
    """The `completions` (best first) of each row of a ranked data file, as text."""
    rows = []
    for line, row in read_rows(path, ("completions",)):
        completions = row["completions"]
        if not isinstance(completions, list) or not completions:
            raise InputError(f"{path}:{line}: 'completions' must be a non-empty list, best first")
        rows.append([completion_text(c, f"{path}:{line}: completions[{k}]") for k, c in enumerate(completions)])
    return rows


def length_bias(ranked_file: str | None = None, outputs: dict[str, str] | None = None, tokenizer=None) -> dict:
    """Length statistics of a ranked data file and of models' answer files.

    Args:
        ranked_file: JSONL/JSON rows with `completions`, best first.
        outputs: `{model name: answer file}` (rows with `question_id` and `answer`, see `load_answers`).
        tokenizer: a `transformers` tokenizer, to also count tokens.

    Returns:
        `{"ranked": length_by_rank(...) plus "file" and "rows" (or None), "outputs": {name: {"file", "count",
        "words_mean", "tokens_mean"?}}}`.
    """
    if ranked_file is None and not outputs:
        raise InputError("Give a ranked data file, answer files of models, or both.")
    result = {"ranked": None, "outputs": {}}
    if ranked_file is not None:
        rows = read_ranked_completions(ranked_file)
        result["ranked"] = {"file": str(ranked_file), "rows": len(rows), **length_by_rank(rows, tokenizer)}
    for name, path in (outputs or {}).items():
        answers = load_answers(path)
        result["outputs"][name] = {"file": str(path), **_means([_length(a, tokenizer) for a in answers.values()])}
    return result


def length_bias_markdown(result: dict) -> str:
    """Tables of a `length_bias` result: words (and tokens) by rank position, then by model."""
    from .report import markdown_table

    parts = ["## Response length"]
    has_tokens = any("tokens_mean" in p for p in (result["ranked"] or {}).get("positions", [])) or any(
        "tokens_mean" in o for o in result["outputs"].values()
    )
    headers = ["count", "mean words"] + (["mean tokens"] if has_tokens else [])

    def cells(stats):
        return [stats["count"], stats["words_mean"]] + ([stats.get("tokens_mean")] if has_tokens else [])

    ranked = result["ranked"]
    if ranked:
        parts += ["", f"### By rank position in {ranked['file']} ({ranked['rows']} rows; rank 0 = best)", ""]
        parts.append(markdown_table(["rank"] + headers, [[p["rank"], *cells(p)] for p in ranked["positions"]]))
        if ranked["pairs"]:
            parts += [
                "",
                f"The better-ranked response is the longer one (in words) in {100 * ranked['longer_preferred']:.1f}% "
                f"of {ranked['pairs']} ranked pairs, the shorter one in {100 * ranked['shorter_preferred']:.1f}%.",
            ]
    if result["outputs"]:
        parts += ["", "### Model outputs", ""]
        parts.append(markdown_table(["model"] + headers, [[name, *cells(o)] for name, o in result["outputs"].items()]))
    return "\n".join(parts) + "\n"


def plot_length_bias(result: dict, path: str | os.PathLike, unit: str = "words") -> str:
    """Save a PNG: mean length by rank position (bars) and each model's mean output length (dashed lines).

    Args:
        unit: `"words"` or `"tokens"` (needs token counts in `result`).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    key = f"{unit}_mean"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ranked = result.get("ranked")
    if ranked and ranked["positions"]:
        ranks = [p["rank"] for p in ranked["positions"]]
        ax.bar(ranks, [p.get(key) or 0 for p in ranked["positions"]], color="tab:blue", alpha=0.8, label="ranked data")
        ax.set_xticks(ranks, [f"{k}" + (" (best)" if k == 0 else "") for k in ranks])
        ax.set_xlabel("rank position")
    colors = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray"]
    for k, (name, stats) in enumerate(result.get("outputs", {}).items()):
        if stats.get(key) is not None:
            ax.axhline(stats[key], linestyle="--", color=colors[k % len(colors)], label=f"{name} outputs")
    ax.set_ylabel(f"mean length ({unit})")
    ax.set_title("Response length by rank position")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
