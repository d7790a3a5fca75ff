"""Pairwise evaluation with an LLM judge (the paper's Vicuna QA comparison): the judge sees model A's and model B's
answers to a question in both orders, and a model wins only when both orders agree; anything else is a tie.

Asking twice with the order swapped cancels the judge's position bias: a judge that always prefers the first answer
gives a tie, not a win. A verdict that cannot be read is reported as an error, never guessed.

The run reuses generation's runner (`tuna_trl.generation.run_ranker`): concurrent, resumable (question ids already
in the verdicts file are skipped, a torn last line is cut off), with failures in `<verdicts>.errors.jsonl`.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ..generation.inputs import InputError, Instruction
from ..generation.jsonl import id_key
from ..generation.judge import JudgeParseError
from ..generation.rankers import RowFailure
from ..generation.runner import errors_path, run_ranker
from ..generation.sample import Backend, track_usage
from .inputs import read_rows


# Written for this project. Placeholders: {question}, {answer_a}, {answer_b}; filled in one pass, so braces inside
# the answers are left alone.
PAIRWISE_JUDGE_PROMPT = """\
You are an impartial expert comparing how well two AI assistants answered the same user question.

Judge which answer serves the user better: consider helpfulness, relevance, accuracy, depth, creativity and level \
of detail. Do not let the order in which the answers are shown, their length, or the assistants' names sway you; \
a longer answer is better only when its extra content is useful.

[Question]
{question}

[The Start of Assistant A's Answer]
{answer_a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{answer_b}
[The End of Assistant B's Answer]

First compare the two answers in a few sentences. Then give your verdict on the last line, exactly as one of: \
"[[A]]" if Assistant A's answer is better, "[[B]]" if Assistant B's answer is better, "[[C]]" for a tie."""

_VERDICT_RE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
OUTCOMES = ("win", "lose", "tie")


def build_pairwise_prompt(question: str, answer_a: str, answer_b: str, template: str | None = None) -> str:
    """The judge prompt showing `answer_a` as Assistant A and `answer_b` as Assistant B (default template:
    `PAIRWISE_JUDGE_PROMPT`)."""
    values = {"question": question.strip(), "answer_a": answer_a.strip(), "answer_b": answer_b.strip()}
    template = PAIRWISE_JUDGE_PROMPT if template is None else template
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


def parse_pairwise_verdict(text: str) -> str:
    """The judge's verdict: `"A"`, `"B"` or `"C"` (tie), from the last `[[A]]`, `[[B]]` or `[[C]]` in `text`.

    The last one counts (as the last `rank:` does in `parse_judge_output`), so a judge that first repeats the
    answer format is still read right.

    Raises:
        JudgeParseError: there is no such verdict (with `raw` = the text).
    """
    found = _VERDICT_RE.findall(text or "")
    if not found:
        raise JudgeParseError("no verdict '[[A]]', '[[B]]' or '[[C]]' in the judge's answer", raw=text)
    return found[-1]


def combine_verdicts(verdict_ab: str, verdict_ba: str) -> str:
    """Model A's outcome from the verdicts with A shown first (`verdict_ab`) and with B shown first (`verdict_ba`):
    `"win"` or `"lose"` when both orders prefer the same model, else `"tie"`.

    >>> combine_verdicts("A", "B"), combine_verdicts("A", "A"), combine_verdicts("B", "A"), combine_verdicts("C", "B")
    ('win', 'tie', 'lose', 'tie')
    """
    winner_ab = {"A": "a", "B": "b", "C": "tie"}[verdict_ab]
    winner_ba = {"A": "b", "B": "a", "C": "tie"}[verdict_ba]  # B's answer is shown as Assistant A here
    if winner_ab == winner_ba == "a":
        return "win"
    if winner_ab == winner_ba == "b":
        return "lose"
    return "tie"


class PairwiseJudge:
    """A generation "ranker" (chunk of `Instruction`s -> rows or `RowFailure`s) that judges each question's two
    answers in both orders with `backend` at temperature 0.

    Args:
        answers_a, answers_b: `{str(question_id): answer}`.
        template: the judge prompt template (default `PAIRWISE_JUDGE_PROMPT`).
    """

    def __init__(
        self,
        backend: Backend,
        answers_a: dict[str, str],
        answers_b: dict[str, str],
        questions: dict[str, dict],
        template: str | None = None,
        max_new_tokens: int = 1024,
        names: tuple[str, str] = ("model_a", "model_b"),
    ):
        self.backend = backend
        self.answers_a, self.answers_b = answers_a, answers_b
        self.questions = questions
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.names = names

    def __call__(self, instructions: list[Instruction]) -> list[dict | RowFailure]:
        prompts = []
        for instruction in instructions:
            key = str(instruction.id)
            a, b = self.answers_a[key], self.answers_b[key]
            prompts += [
                build_pairwise_prompt(instruction.instruction, a, b, self.template),
                build_pairwise_prompt(instruction.instruction, b, a, self.template),
            ]
        with track_usage() as usage:
            answers = self.backend.generate(prompts, n=1, temperature=0.0, max_new_tokens=self.max_new_tokens)
        rows = []
        for k, instruction in enumerate(instructions):
            raw_ab, raw_ba = answers[2 * k][0].text, answers[2 * k + 1][0].text
            rows.append(self._row(instruction, raw_ab, raw_ba, usage.as_dict(), len(instructions)))
        return rows

    def _row(
        self, instruction: Instruction, raw_ab: str, raw_ba: str, usage: dict, shared_by: int
    ) -> dict | RowFailure:
        verdicts, failures = {}, []
        for order, raw in (("ab", raw_ab), ("ba", raw_ba)):
            try:
                verdicts[order] = parse_pairwise_verdict(raw)
            except JudgeParseError as err:
                failures.append(f"order {order} ({self._shown_first(order)} shown first): {err.reason}")
        if failures:
            raw = f"=== order ab ===\n{raw_ab}\n=== order ba ===\n{raw_ba}"
            return RowFailure("judge", "; ".join(failures), raw=raw)
        question = self.questions[str(instruction.id)]
        return {
            "id": instruction.id,
            "question_id": question["question_id"],
            "category": question.get("category", ""),
            "outcome": combine_verdicts(verdicts["ab"], verdicts["ba"]),
            "verdict_ab": verdicts["ab"],
            "verdict_ba": verdicts["ba"],
            "judgment_ab": raw_ab,
            "judgment_ba": raw_ba,
            "meta": {
                "judge": getattr(self.backend, "name", type(self.backend).__name__),
                "model_a": self.names[0],
                "model_b": self.names[1],
                "usage": usage,
                "usage_shared_by": shared_by,
            },
        }

    def _shown_first(self, order: str) -> str:
        return self.names[0] if order == "ab" else self.names[1]


def _check_answers(questions: list[dict], answers: dict[str, str], name: str) -> None:
    missing = [q["question_id"] for q in questions if str(q["question_id"]) not in answers]
    if missing:
        raise InputError(
            f"The answers of {name} have no answer for question_id {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; answer files need a row per question."
        )


def judge_pairwise(
    questions: list[dict],
    answers_a: dict[str, str],
    answers_b: dict[str, str],
    backend: Backend,
    output: str,
    names: tuple[str, str] = ("model_a", "model_b"),
    concurrency: int = 8,
    template: str | None = None,
    max_new_tokens: int = 1024,
    progress: bool = True,
) -> dict:
    """Judge every question not yet in `output` (a JSONL file of verdicts), then summarise them all.

    Args:
        questions: from `load_questions` (each needs `question_id`, `question`, optional `category`).
        answers_a, answers_b: `{str(question_id): answer}` of model A and model B.
        backend: the judge (e.g. `tuna_trl.generation.OpenAIBackend(..., api="chat")`).
        output: the verdicts file; a rerun skips the questions already there and retries the failed ones.
        concurrency: questions judged at once (each sends its two requests together).

    Returns:
        `pairwise_summary(...)` of the questions: counts, rates, per-question verdicts and the failures.

    Raises:
        InputError (a ValueError): a question has no answer from one of the models.
        BackendConfigError: the judge endpoint cannot work (bad key, unknown model); verdicts written so far stay.
    """
    _check_answers(questions, answers_a, names[0])
    _check_answers(questions, answers_b, names[1])
    by_id = {str(q["question_id"]): q for q in questions}
    instructions = [
        Instruction(q["question_id"], q["question"], q["question"], None, None, q.get("line", 0)) for q in questions
    ]
    judge = PairwiseJudge(backend, answers_a, answers_b, by_id, template, max_new_tokens, names)
    run = run_ranker(
        instructions, output, judge, workers=concurrency, chunk_size=1, progress=progress, description="judging"
    )
    summary = pairwise_summary(questions, output, names, getattr(backend, "name", None))
    summary["run"] = {
        "written": run.written,
        "skipped": run.skipped,
        "errors": run.errors,
        "prompt_tokens": run.prompt_tokens,
        "completion_tokens": run.completion_tokens,
        "seconds": round(run.seconds, 3),
    }
    return summary


def pairwise_summary(
    questions: list[dict], output: str, names: tuple[str, str] = ("model_a", "model_b"), judge: str | None = None
) -> dict:
    """Win / lose / tie of model A over `questions`, from the verdicts in `output` and the failures in its errors file.

    Returns:
        `{"model_a", "model_b", "judge", "questions", "judged", "win", "lose", "tie", "failed", "win_rate",
        "lose_rate", "tie_rate", "order_agreement", "by_category": {category: {"win", "lose", "tie"}}, "verdicts":
        [{"question_id", "category", "verdict_ab", "verdict_ba", "outcome"}], "failures": [{"question_id",
        "stage", "reason"}], "verdicts_file", "errors_file"}`. Rates are over judged questions; `order_agreement`
        is the share of judged questions whose two verdicts name the same winner (or both a tie). Failed questions
        count in none of win / lose / tie.
    """
    wanted = {id_key(q["question_id"]) for q in questions}
    rows = {id_key(r["id"]): r for _, r in read_rows(output)} if Path(output).exists() else {}
    rows = {key: row for key, row in rows.items() if key in wanted}
    errors = {}
    if Path(errors_path(output)).exists():
        for _, failure in read_rows(errors_path(output)):
            if id_key(failure["id"]) in wanted and id_key(failure["id"]) not in rows:
                errors[id_key(failure["id"])] = failure
    ordered = [rows[id_key(q["question_id"])] for q in questions if id_key(q["question_id"]) in rows]
    counts = Counter(row["outcome"] for row in ordered)
    by_category: dict[str, Counter] = {}
    for row in ordered:
        by_category.setdefault(row.get("category", ""), Counter())[row["outcome"]] += 1
    judged = len(ordered)
    agreed = sum(
        combine_verdicts(r["verdict_ab"], r["verdict_ba"]) != "tie" or r["verdict_ab"] == r["verdict_ba"] == "C"
        for r in ordered
    )
    return {
        "model_a": names[0],
        "model_b": names[1],
        "judge": judge,
        "questions": len(questions),
        "judged": judged,
        **{outcome: counts[outcome] for outcome in OUTCOMES},
        "failed": len(questions) - judged,
        **{f"{outcome}_rate": counts[outcome] / judged if judged else None for outcome in OUTCOMES},
        "order_agreement": agreed / judged if judged else None,
        "by_category": {c: {o: n[o] for o in OUTCOMES} for c, n in sorted(by_category.items())},
        "verdicts": [
            {k: row[k] for k in ("question_id", "category", "verdict_ab", "verdict_ba", "outcome")} for row in ordered
        ],
        "failures": [
            {"question_id": f["id"], "stage": f.get("stage"), "reason": f.get("reason")} for key, f in errors.items()
        ]
        + [
            {"question_id": q["question_id"], "stage": "not run", "reason": "not judged yet (rerun to judge it)"}
            for q in questions
            if id_key(q["question_id"]) not in rows and id_key(q["question_id"]) not in errors
        ],
        "verdicts_file": str(output),
        "errors_file": errors_path(output),
    }


def pairwise_markdown(summary: dict) -> str:
    """The win / lose / tie table (overall and by category) and the per-question verdicts of a `pairwise_summary`."""
    from .report import markdown_table

    a, b = summary["model_a"], summary["model_b"]
    title = f"## Pairwise: {a} vs {b}" + (f" (judge: {summary['judge']})" if summary.get("judge") else "")
    rate = lambda x: None if x is None else 100.0 * x  # noqa: E731
    overall = markdown_table(
        ["", "win", "lose", "tie", "failed", "win %", "lose %", "tie %", "order agreement %"],
        [
            [
                f"{a} vs {b}",
                summary["win"],
                summary["lose"],
                summary["tie"],
                summary["failed"],
                rate(summary["win_rate"]),
                rate(summary["lose_rate"]),
                rate(summary["tie_rate"]),
                rate(summary["order_agreement"]),
            ]
        ],
    )
    categories = markdown_table(
        ["category", "win", "lose", "tie"],
        [[c or "(none)", n["win"], n["lose"], n["tie"]] for c, n in summary["by_category"].items()],
    )
    preferred_ab, preferred_ba = {"A": a, "B": b, "C": "tie"}, {"A": b, "B": a, "C": "tie"}
    verdicts = markdown_table(
        [
            "question_id",
            "category",
            f"judge prefers ({a} shown first)",
            f"judge prefers ({b} shown first)",
            f"outcome for {a}",
        ],
        [
            [
                str(v["question_id"]),
                v["category"],
                preferred_ab[v["verdict_ab"]],
                preferred_ba[v["verdict_ba"]],
                v["outcome"],
            ]
            for v in summary["verdicts"]
        ],
    )
    parts = [
        title,
        "",
        f"Each question is judged twice, with {a}'s answer shown first and then {b}'s; a win or loss "
        "counts only when both orders prefer the same model, anything else is a tie.",
        "",
        overall,
        "",
        "### By category",
        "",
        categories,
        "",
        "### Per question",
        "",
        verdicts,
    ]
    if summary["failures"]:
        failures = markdown_table(
            ["question_id", "stage", "reason"],
            [[str(f["question_id"]), f["stage"], f["reason"]] for f in summary["failures"]],
        )
        parts += [
            "",
            f"### Not judged ({len(summary['failures'])}): see {summary['errors_file']}; a rerun retries them",
            "",
            failures,
        ]
    return "\n".join(parts) + "\n"
