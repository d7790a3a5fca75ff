"""Probabilistic ranking, diverse sampling and the two rankers, on scripted backends."""

import pytest

from tuna_trl.generation import (
    ContextualRanker,
    Instruction,
    ProbabilisticRanker,
    RowFailure,
    Sample,
    ScoreJudge,
    probabilistic_rank,
    probabilistic_score,
    rouge_l,
    sample_diverse,
    sample_diverse_many,
)


def test_probabilistic_score_is_length_normalized():
    assert probabilistic_score([-1.0, -2.0, -3.0], beta=1.3) == pytest.approx(-6.0 / 3**1.3)
    assert probabilistic_score([-2.0, -2.0], beta=1.0) == -2.0


def test_probabilistic_rank_best_first_with_stable_ties():
    samples = [
        Sample("a", [-2.0, -2.0]),  # -4 / 2**1.3 = -1.62
        Sample("b", [-1.0]),  # -1
        Sample("c", [-3.0, -1.0, -0.5, -0.5]),  # -5 / 4**1.3 = -0.825
        Sample("d", [-1.0]),  # ties with b, sampled later
    ]
    assert [s.text for s in probabilistic_rank(samples)] == ["c", "b", "d", "a"]
    # beta = 0 ranks by the summed log-prob instead: short answers win
    assert [s.text for s in probabilistic_rank(samples, beta=0.0)] == ["b", "d", "a", "c"]


def test_probabilistic_rank_refuses_missing_logprobs():
    with pytest.raises(ValueError, match="log-probs"):
        probabilistic_rank([Sample("a", [-1.0]), Sample("b", None)])
    with pytest.raises(ValueError, match="log-prob"):
        probabilistic_rank([Sample("a", [-1.0, None])])


class ScriptedBackend:
    """Answers prompt p at temperature t with the next text of script[(p, round(t, 3))]."""

    name = "scripted"

    def __init__(self, script):
        self.script = {key: list(texts) for key, texts in script.items()}
        self.calls = []

    def generate(self, prompts, n=1, temperature=1.0, max_new_tokens=256, logprobs=False):
        self.calls.append((list(prompts), n, round(temperature, 3)))
        out = []
        for prompt in prompts:
            texts = self.script[(prompt, round(temperature, 3))]
            out.append([Sample(texts.pop(0), [-1.0] * 3 if logprobs else None) for _ in range(n)])
        return out


def test_sample_diverse_keeps_distinct_samples_without_resampling():
    backend = ScriptedBackend({("p", 1.0): ["red apple pie", "blue sky today", "green grass field"]})
    samples = sample_diverse(backend, "p", n=3)
    assert [s.text for s in samples] == ["red apple pie", "blue sky today", "green grass field"]
    assert len(backend.calls) == 1


def test_sample_diverse_raises_temperature_until_a_sample_differs():
    backend = ScriptedBackend(
        {
            ("p", 1.0): ["the cat sat on the mat", "the cat sat on the mat", "dogs bark loudly at night"],
            ("p", 1.1): ["the cat sat on a mat"],  # still similar (ROUGE-L 5/6 >= 0.8)
            ("p", 1.2): ["a bird sings"],
        }
    )
    [(samples, info)] = sample_diverse_many(backend, ["p"], n=3, tau=0.8, temperature_step=0.1, max_trials=3)
    assert [s.text for s in samples] == ["the cat sat on the mat", "a bird sings", "dogs bark loudly at night"]
    assert info == {"trials": 2, "temperatures": [1.0, 1.2, 1.0]}


def test_sample_diverse_keeps_the_least_similar_trial_when_none_passes():
    first = "one two three four five"
    backend = ScriptedBackend(
        {
            ("p", 1.0): [first, first],
            ("p", 1.5): ["one two three four five six"],
            ("p", 2.0): ["one two three four"],  # the least similar of the tried ones
            ("p", 2.5): ["one two three four five seven"],
        }
    )
    [(samples, info)] = sample_diverse_many(backend, ["p"], n=2, tau=0.5, temperature_step=0.5, max_trials=3)
    assert samples[1].text == "one two three four"
    assert rouge_l(first, samples[1].text) >= 0.5
    assert info == {"trials": 3, "temperatures": [1.0, 2.0]}


def test_sample_diverse_batches_prompts_into_one_call_per_round():
    backend = ScriptedBackend(
        {
            ("p", 1.0): ["x y z", "x y z"],
            ("q", 1.0): ["x y z", "x y z"],
            ("p", 1.1): ["a b c"],
            ("q", 1.1): ["d e f"],
        }
    )
    result = sample_diverse_many(backend, ["p", "q"], n=2)
    assert [[s.text for s in samples] for samples, _ in result] == [["x y z", "a b c"], ["x y z", "d e f"]]
    assert backend.calls == [(["p", "q"], 2, 1.0), (["p", "q"], 1, 1.1)]


def _instruction(i, reference=None):
    return Instruction(
        id=i, prompt=f"prompt {i}", instruction=f"instruction {i}", input=None, reference=reference, line=i + 1
    )


def test_probabilistic_ranker_rows():
    class Teacher:
        name = "teacher"

        def generate(self, prompts, n=1, temperature=1.0, max_new_tokens=256, logprobs=False):
            assert logprobs
            return [
                [Sample("short", [-0.5]), Sample("   ", [-0.1]), Sample("longer one", [-0.2, -0.3])] for _ in prompts
            ]

    rows = ProbabilisticRanker(Teacher(), n=3)([_instruction(0, reference="gold"), _instruction(1)])
    assert [row["completions"] for row in rows] == [["longer one", "short"]] * 2  # the empty sample dropped
    assert rows[0]["reference"] == "gold" and rows[1]["reference"] is None
    assert rows[0]["scores"] == [pytest.approx(-0.5 / 2**1.3), -0.5]
    assert rows[0]["meta"]["empty_samples_dropped"] == 1 and rows[0]["meta"]["teacher"] == "teacher"


def test_contextual_ranker_with_a_rule_based_judge():
    backend = ScriptedBackend(
        {
            ("prompt 0", 1.0): ["4", "four is the answer", "5"],
            ("prompt 1", 1.0): ["", "", ""],
        }
    )
    judge = ScoreJudge(
        lambda response, reference: float(response == reference) + rouge_l(reference, response), name="gold"
    )
    rows = ContextualRanker(backend, judge, n=3)([_instruction(0, reference="4"), _instruction(1, reference="4")])
    assert rows[0]["completions"] == ["4", "four is the answer", "5"]  # equal scores keep the sampling order
    assert rows[0]["scores"][0] == 2.0 and rows[0]["meta"]["judge"] == "gold"
    assert isinstance(rows[1], RowFailure) and rows[1].stage == "generate"
