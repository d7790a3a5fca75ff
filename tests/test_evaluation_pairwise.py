"""Pairwise judging against a real HTTP judge (tests/fake_judge_server.py, its own process): agreement, disagreement
(a tie), unparseable verdicts (reported, never guessed), retries, resume, and the CLI with a local model."""

import json

import pytest
from fake_judge_server import FakeJudge

from tuna_trl.evaluation import (
    build_pairwise_prompt,
    combine_verdicts,
    judge_pairwise,
    load_answers,
    load_questions,
    parse_pairwise_verdict,
)
from tuna_trl.generation import JudgeParseError, OpenAIBackend


# question_id -> (answer of A, answer of B, expected outcome for A); the fake judge prefers the answer with more words
CASES = {
    1: ("a long and detailed answer", "short", "win"),
    2: ("short", "a long and detailed answer", "lose"),
    3: ("same length", "equal words", "tie"),  # [[C]] in both orders
    4: ("FIRSTBIAS one", "two words here", "tie"),  # [[A]] in both orders: the orders disagree
    5: ("ECHO a long and detailed answer", "short", "win"),  # the format echo is skipped: the last verdict counts
    6: ("FAIL500 long and detailed", "short", "win"),  # the first request fails with 500 and is retried
    7: ("GARBLE", "anything", None),  # no verdict: reported, not counted
}


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    questions = _write(
        tmp_path / "questions.jsonl",
        [{"question_id": q, "category": "math" if q % 2 else "writing", "turns": [f"Question {q}?"]} for q in CASES],
    )
    answers_a = _write(tmp_path / "a.jsonl", [{"question_id": q, "answer": a} for q, (a, _, _) in CASES.items()])
    # model B's file in FastChat's format, ids as strings: both must be read
    answers_b = _write(
        tmp_path / "b.jsonl",
        [{"question_id": str(q), "choices": [{"index": 0, "turns": [b]}]} for q, (_, b, _) in CASES.items()],
    )
    return questions, answers_a, answers_b


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch

    from tuna_trl.tiny import save_tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from threads; on a busy machine they cost seconds
    yield save_tiny(str(tmp_path_factory.mktemp("tiny")))
    torch.set_num_threads(threads)


def _backend(judge):
    return OpenAIBackend(
        "fake-judge", base_url=judge.base_url, api="chat", max_concurrency=8, backoff_initial=0.01, backoff_max=0.05
    )


def test_parse_and_combine_verdicts():
    assert parse_pairwise_verdict("A is better.\n[[A]]") == "A"
    assert parse_pairwise_verdict('Answer "[[A]]", "[[B]]" or "[[C]]".\nVerdict: [[ B ]]') == "B"
    assert parse_pairwise_verdict("[[C]]") == "C"
    for text in ("A is better", "[A]", "[[D]]", ""):
        with pytest.raises(JudgeParseError) as err:
            parse_pairwise_verdict(text)
        assert err.value.raw == text
    assert [
        combine_verdicts(x, y) for x, y in [("A", "B"), ("B", "A"), ("A", "A"), ("B", "B"), ("C", "C"), ("A", "C")]
    ] == ["win", "lose", "tie", "tie", "tie", "tie"]
    prompt = build_pairwise_prompt("Q {x}?", "first {answer_b}", "second")
    assert "Q {x}?" in prompt and "first {answer_b}" in prompt  # braces inside texts are left alone
    assert prompt.index("first") < prompt.index("second")


def test_pairwise_against_judge_server(files, tmp_path):
    questions_path, answers_a, answers_b = files
    questions = load_questions(questions_path)
    output = str(tmp_path / "verdicts.jsonl")
    answers = load_answers(answers_a), load_answers(answers_b)
    with FakeJudge() as judge:
        backend = _backend(judge)
        summary = judge_pairwise(
            questions, *answers, backend, output, names=("tuna", "sft"), concurrency=4, progress=False
        )
        outcomes = {v["question_id"]: v["outcome"] for v in summary["verdicts"]}
        assert outcomes == {q: expected for q, (_, _, expected) in CASES.items() if expected}
        assert (summary["win"], summary["lose"], summary["tie"], summary["failed"]) == (3, 1, 2, 1)
        assert summary["win_rate"] == pytest.approx(3 / 6)
        assert summary["order_agreement"] == pytest.approx(5 / 6)  # all but the position-biased question
        assert summary["by_category"]["math"] == {"win": 2, "lose": 0, "tie": 1}  # questions 1, 3, 5 (7 failed)
        verdicts = {v["question_id"]: (v["verdict_ab"], v["verdict_ba"]) for v in summary["verdicts"]}
        assert verdicts[1] == ("A", "B") and verdicts[4] == ("A", "A") and verdicts[3] == ("C", "C")

        # the unparseable question is reported with the judge's text, not guessed
        [failure] = summary["failures"]
        assert failure["question_id"] == 7 and failure["stage"] == "judge" and "no verdict" in failure["reason"]
        [error_row] = [json.loads(line) for line in open(summary["errors_file"])]
        assert error_row["id"] == 7 and "cannot choose" in error_row["raw"]
        assert 7 not in {json.loads(line)["id"] for line in open(output)}
        requests = judge.requests()
        assert requests == 2 * len(CASES) + 2  # two orders per question, plus a failed first try of each FAIL500 order

        # a rerun judges only what is missing: the failed question, in both orders
        again = judge_pairwise(questions, *answers, backend, output, names=("tuna", "sft"), progress=False)
        assert judge.requests() == requests + 2
        assert again["run"]["skipped"] == 6 and again["failed"] == 1
        assert {k: again[k] for k in ("win", "lose", "tie")} == {k: summary[k] for k in ("win", "lose", "tie")}
        assert len(open(output).readlines()) == 6
        backend.close()


def test_missing_answer_is_an_error(files):
    questions_path, answers_a, _ = files
    questions = load_questions(questions_path)
    partial = {k: v for k, v in load_answers(answers_a).items() if k != "3"}
    with pytest.raises(ValueError, match="sft.*question_id 3"):
        judge_pairwise(
            questions, load_answers(answers_a), partial, backend=None, output="unused", names=("tuna", "sft")
        )


def test_cli_pairwise_with_a_local_model(files, tmp_path, tiny_model_dir):
    from tuna_trl.cli import main

    questions_path, _, answers_b = files
    out = tmp_path / "eval"
    with FakeJudge() as judge:
        argv = [
            "eval",
            "pairwise",
            "--questions",
            questions_path,
            "--model-a",
            tiny_model_dir,
            "--answers-b",
            answers_b,
            "--name-a",
            "tiny",
            "--judge-model",
            "fake-judge",
            "--judge-base-url",
            judge.base_url,
            "--limit",
            "3",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "2",
            "--output-dir",
            str(out),
            "--no-progress",
        ]
        assert main(argv) == 0
        generated = [json.loads(line) for line in open(out / "answers_a.jsonl")]
        assert [row["question_id"] for row in generated] == [1, 2, 3] and all("answer" in row for row in generated)
        summary = json.loads((out / "pairwise.json").read_text())
        assert summary["model_a"] == "tiny" and summary["model_b"] == "b" and summary["judged"] == 3
        assert summary["win"] + summary["lose"] + summary["tie"] == 3
        markdown = (out / "pairwise.md").read_text()
        assert "| tiny vs b | " in markdown and "### Per question" in markdown
        # a rerun reuses the generated answers and the verdicts
        requests = judge.requests()
        assert main(argv) == 0
        assert judge.requests() == requests and len(open(out / "answers_a.jsonl").readlines()) == 3


def test_cli_reports_bad_input(tmp_path, capsys):
    from tuna_trl.cli import main

    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["ok"]}\n{"question_id": 2}\n')
    code = main(
        [
            "eval",
            "pairwise",
            "--questions",
            str(bad),
            "--answers-a",
            str(bad),
            "--answers-b",
            str(bad),
            "--judge-model",
            "x",
            "--judge-base-url",
            "http://127.0.0.1:9/v1",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 2 and f"{bad}:2: missing field 'turns'" in capsys.readouterr().err
