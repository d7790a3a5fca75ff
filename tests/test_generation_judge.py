"""The judge prompt, reading judge answers, and the judge interface (LLM and rule-based)."""

import pytest

from tuna_trl.generation import (
    JudgeParseError,
    JudgeVerdict,
    LLMJudge,
    Sample,
    ScoreJudge,
    build_judge_prompt,
    default_judge_template,
    parse_judge_output,
    rouge_l,
)


def test_prompt_has_the_required_structure():
    prompt = build_judge_prompt("Name a color.", ["Red.", "Blue {not a placeholder}", "Red."], input="Be brief.")
    for part in (
        "Name a color.",
        "### Input\nBe brief.",
        "### Response 0\nRed.",
        "### Response 2\nRed.",
        "Blue {not a placeholder}",
        "open-ended",
        "close-ended",
        'Response 3"',
        "duplicate",
        "Response k: [score]",
        "rank: [i, j, ...]",
        "relevance",
        "clarity",
        "0 to 15",
    ):
        assert part in prompt, part
    assert "{" not in prompt.replace("{not a placeholder}", "")  # every placeholder filled
    assert "### Input" not in build_judge_prompt("Name a color.", ["Red."])


def test_prompt_template_can_be_overridden():
    template = "Q: {instruction}{input_section}\n{responses}\nYour answer is Response {judge_index}. {unknown}"
    prompt = build_judge_prompt("Why?", ["Because."], template=template)
    assert prompt == "Q: Why?\n### Response 0\nBecause.\nYour answer is Response 1. {unknown}"
    assert default_judge_template().count("{responses}") == 1


def test_parse_well_formed():
    text = (
        "Close-ended.\nResponse 4: my answer\nResponse 0: [12]\nResponse 1: [7]\nResponse 2: [14]\nResponse 3: [3]\n"
        "Response 4: [15]\nrank: [4, 2, 0, 1, 3]"
    )
    verdict = parse_judge_output(text, 4)
    assert verdict.ranking == [4, 2, 0, 1, 3]
    assert verdict.model_ranking() == [2, 0, 1, 3]
    assert verdict.scores == {0: 12.0, 1: 7.0, 2: 14.0, 3: 3.0, 4: 15.0}
    assert verdict.raw == text


def test_parse_shortened_ranking_with_duplicates_left_out():
    verdict = parse_judge_output("Responses 1 and 3 are duplicates of 0.\nRank: [2, 4, 0]", 4)
    assert verdict.ranking == [2, 4, 0] and verdict.model_ranking() == [2, 0]


def test_parse_takes_the_last_list_of_integers_after_an_echoed_format():
    text = 'As asked, I end with "rank: [i, j, ...]".\nAn example would be RANK: [0, 1].\nResponse 1: [9]\n**Rank:** [1, 0, 2]'
    verdict = parse_judge_output(text, 2)
    assert verdict.ranking == [1, 0, 2]
    assert parse_judge_output("rank: [Response 1, Response 0]", 2).ranking == [1, 0]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("I cannot rank these.", "no 'rank"),
        ("rank: [i, j, ...]", "no 'rank"),
        ("frank: [0, 1]", "no 'rank"),
        ("rank: []", "empty"),
        ("rank: [0, 5]", "out of range"),
        ("rank: [0, -1]", "out of range"),
        ("rank: [1, 0, 1]", "more than once"),
    ],
)
def test_parse_malformed(text, reason):
    with pytest.raises(JudgeParseError, match=reason) as info:
        parse_judge_output(text, 3)
    assert info.value.raw == text


class _CannedBackend:
    name = "canned"

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def generate(self, prompts, n=1, temperature=1.0, max_new_tokens=256, logprobs=False):
        self.calls.append((prompts, n, temperature))
        return [[Sample(self.answer)] for _ in prompts]


def test_llm_judge_asks_at_temperature_zero_and_parses():
    backend = _CannedBackend("Response 0: [3]\nResponse 1: [10]\nrank: [2, 1, 0]")
    verdict = LLMJudge(backend)("Add 2 and 2.", ["5", "4"], input=None, reference="4")
    assert verdict.model_ranking() == [1, 0] and verdict.scores == {0: 3.0, 1: 10.0}
    [(prompts, n, temperature)] = backend.calls
    assert n == 1 and temperature == 0.0 and "### Response 1\n4" in prompts[0]
    with pytest.raises(JudgeParseError) as info:
        LLMJudge(_CannedBackend("no idea"))("Add 2 and 2.", ["5", "4"])
    assert info.value.raw == "no idea"


def test_rule_based_judges_share_the_interface():
    exact_then_rouge = ScoreJudge(
        lambda response, reference: float(response.strip() == reference) + rouge_l(reference, response)
    )
    verdict = exact_then_rouge("Reverse 'a b c'.", ["c b a", "a b c", "c b a ", "c a"], reference="c b a")
    assert verdict.model_ranking() == [0, 3, 1]  # the duplicate 2 is left out
    assert verdict.scores[0] == 2.0

    def plain_function(instruction, responses, input=None, reference=None):
        return JudgeVerdict(ranking=sorted(range(len(responses)), key=lambda k: len(responses[k])))

    assert plain_function("x", ["ccc", "a", "bb"]).model_ranking() == [1, 2, 0]
