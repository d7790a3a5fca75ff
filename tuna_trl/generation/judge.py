"""Judges that rank a prompt's responses for contextual ranking (Tuna Sec. 2.2).

A judge is any callable

    judge(instruction: str, responses: list[str], input: str | None = None, reference: str | None = None)
        -> JudgeVerdict

`LLMJudge` asks a model with the judge prompt; `ScoreJudge` wraps a rule such as "exact match with the gold answer,
then ROUGE-L"; a reward model fits the same mould. The runner only reads `verdict.model_ranking()` and
`verdict.scores`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Protocol

from .sample import Backend


class JudgeParseError(ValueError):
    """The judge's answer holds no usable `rank: [...]` list. `reason` says why; `raw` is the answer itself."""

    def __init__(self, reason: str, raw: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


@dataclass
class JudgeVerdict:
    """A judge's ranking of `responses` (indices into them), best first.

    Attributes:
        ranking: indices best first; may leave out responses (duplicates) and, for an LLM judge, may include
            `num_responses`, the judge's own answer.
        scores: `{index: score}` for whatever responses got a score (0-15 for the LLM judge).
        num_responses: how many responses were judged; the index `num_responses` is the judge's own answer.
            None for judges that write no answer of their own.
        raw: the judge's answer text, if any.
    """

    ranking: list[int]
    scores: dict[int, float] = field(default_factory=dict)
    num_responses: int | None = None
    raw: str | None = None

    def model_ranking(self) -> list[int]:
        """`ranking` without the judge's own answer: indices into the judged responses only."""
        return [i for i in self.ranking if i != self.num_responses]


class Judge(Protocol):
    """What the contextual runner calls; `LLMJudge`, `ScoreJudge` or any function with this signature."""

    def __call__(
        self, instruction: str, responses: list[str], input: str | None = None, reference: str | None = None
    ) -> JudgeVerdict: ...


# ----------------------------------------------------------------------------------------------------------------------
# The prompt


def default_judge_template() -> str:
    """The judge prompt shipped in `tuna_trl/templates/judge_prompt.txt`."""
    return resources.files("tuna_trl").joinpath("templates/judge_prompt.txt").read_text(encoding="utf-8")


def build_judge_prompt(
    instruction: str, responses: list[str], input: str | None = None, template: str | None = None
) -> str:
    """The judge prompt for `responses` to `instruction` (and its `input`).

    `template` (default: `default_judge_template()`) is plain text with these placeholders, filled in one pass so
    that braces inside responses are left alone: `{instruction}`, `{input_section}` (a "### Input" block, or
    nothing when there is no input), `{responses}` ("### Response k" blocks), `{num_responses}` (N),
    `{last_index}` (N-1), `{judge_index}` (N: the judge's own answer) and `{num_total}` (N+1).
    """
    template = default_judge_template() if template is None else template
    blocks = "\n\n".join(f"### Response {k}\n{response.strip()}" for k, response in enumerate(responses))
    values = {
        "instruction": instruction.strip(),
        "input_section": f"\n### Input\n{input.strip()}\n" if input and input.strip() else "",
        "responses": blocks,
        "num_responses": str(len(responses)),
        "last_index": str(len(responses) - 1),
        "judge_index": str(len(responses)),
        "num_total": str(len(responses) + 1),
    }
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


# ----------------------------------------------------------------------------------------------------------------------
# Reading the answer

# "rank: [...]", "Rank: [...]", "**rank:** [...]"; the brackets' content is checked separately so that an echo of the
# instructions' "rank: [i, j, ...]" is skipped rather than taken for the answer
_RANK_RE = re.compile(r"(?<![A-Za-z])rank\s*\**\s*:\s*\**\s*\[([^\[\]]*)\]", re.IGNORECASE)
_RANK_ITEM_RE = re.compile(r"^\s*(?:response\s*)?(-?\d+)\s*$", re.IGNORECASE)
_SCORE_RE = re.compile(r"Response\s+(\d+)\s*\**\s*:\s*\**\s*\[\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+\s*)?\]", re.IGNORECASE)


def _parse_rank_items(content: str) -> list[int] | None:
    """The integers of a bracketed rank list, or None when it is not a list of integers."""
    if not content.strip():
        return []
    items = [_RANK_ITEM_RE.match(item) for item in content.split(",")]
    if not all(items):
        return None
    return [int(item.group(1)) for item in items]


def parse_judge_output(text: str, num_responses: int) -> JudgeVerdict:
    """Read a judge answer written for `build_judge_prompt` with `num_responses` responses.

    The ranking is the last `rank: [...]` label (any case) followed by a bracketed list of integers; valid indices
    are 0..num_responses (num_responses = the judge's own answer). Scores are every `Response k: [x]` found, the
    last one winning for a repeated k.

    Raises:
        JudgeParseError: no such list, an empty list, an index out of range or repeated.
    """
    candidates = [_parse_rank_items(match.group(1)) for match in _RANK_RE.finditer(text)]
    candidates = [items for items in candidates if items is not None]
    if not candidates:
        raise JudgeParseError("no 'rank: [i, j, ...]' list of integers in the judge's answer", raw=text)
    ranking = candidates[-1]
    if not ranking:
        raise JudgeParseError("the judge's rank list is empty", raw=text)
    out_of_range = [i for i in ranking if not 0 <= i <= num_responses]
    if out_of_range:
        raise JudgeParseError(
            f"rank index {out_of_range[0]} is out of range 0..{num_responses} (there are {num_responses} responses "
            f"and the judge's own answer is {num_responses})",
            raw=text,
        )
    repeated = sorted({i for i in ranking if ranking.count(i) > 1})
    if repeated:
        raise JudgeParseError(f"rank index {repeated[0]} appears more than once in {ranking}", raw=text)
    scores = {int(k): float(v) for k, v in _SCORE_RE.findall(text) if 0 <= int(k) <= num_responses}
    return JudgeVerdict(ranking=ranking, scores=scores, num_responses=num_responses, raw=text)


# ----------------------------------------------------------------------------------------------------------------------
# Judges


class LLMJudge:
    """Rank responses by asking `backend` (temperature 0) with the judge prompt and parsing its answer.

    The `reference` argument is accepted for interface compatibility and not shown to the judge: the paper's judge
    writes its own reference answer.

    Raises `JudgeParseError` (with `raw`) when the answer does not parse.
    """

    def __init__(self, backend: Backend, template: str | None = None, max_new_tokens: int = 2048):
        self.backend = backend
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.name = getattr(backend, "name", type(backend).__name__)

    def __call__(
        self, instruction: str, responses: list[str], input: str | None = None, reference: str | None = None
    ) -> JudgeVerdict:
        prompt = build_judge_prompt(instruction, responses, input=input, template=self.template)
        [[answer]] = self.backend.generate([prompt], n=1, temperature=0.0, max_new_tokens=self.max_new_tokens)
        return parse_judge_output(answer.text, len(responses))


class ScoreJudge:
    """A judge from a scoring rule: `score_fn(response, reference) -> float`, higher is better.

    Responses are ranked by score (ties keep their order); exact duplicates (after stripping whitespace) are left
    out, as the LLM judge is told to do. For example, exact match with the gold answer first, then ROUGE-L:

    >>> from tuna_trl.generation import ScoreJudge, rouge_l
    >>> judge = ScoreJudge(lambda response, reference: float(response.strip() == reference.strip()) + rouge_l(reference, response))
    >>> judge("Add 2 and 3.", ["5", "6", "2 + 3 = 5"], reference="5").model_ranking()
    [0, 2, 1]
    """

    def __init__(
        self, score_fn: Callable[[str, str | None], float], name: str | None = None, drop_duplicates: bool = True
    ):
        self.score_fn = score_fn
        self.drop_duplicates = drop_duplicates
        self.name = name or getattr(score_fn, "__name__", type(score_fn).__name__)

    def __call__(
        self, instruction: str, responses: list[str], input: str | None = None, reference: str | None = None
    ) -> JudgeVerdict:
        seen, indices = set(), []
        for k, response in enumerate(responses):
            if self.drop_duplicates and response.strip() in seen:
                continue
            seen.add(response.strip())
            indices.append(k)
        scores = {k: float(self.score_fn(responses[k], reference)) for k in indices}
        ranking = sorted(indices, key=lambda k: (-scores[k], k))
        return JudgeVerdict(ranking=ranking, scores=scores)
