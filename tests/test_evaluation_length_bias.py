"""Length bias: mean length by rank position and of models' outputs, checked by hand on a small file."""

import json

import pytest

from tuna_trl.evaluation import length_bias, length_by_rank


ROWS = [
    {"prompt": "p1", "completions": ["one two three four", "one two", "one"]},  # longest ranked best
    {"prompt": "p2", "completions": ["a b", "a b c d e f"]},  # the longer one ranked worse
    {
        "prompt": "p3",
        "completions": [[{"role": "assistant", "content": "x y z"}], [{"role": "assistant", "content": "x y z"}]],
    },
]


@pytest.fixture
def files(tmp_path):
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"question_id": 1, "answer": "a b c"}) + "\n" + json.dumps({"question_id": 2, "answer": "a"}) + "\n"
    )
    return str(ranked), str(answers)


def test_length_by_rank_numbers(files):
    ranked, answers = files
    result = length_bias(ranked, {"tuna": answers})
    positions = result["ranked"]["positions"]
    assert [(p["rank"], p["count"]) for p in positions] == [(0, 3), (1, 3), (2, 1)]
    assert [p["words_mean"] for p in positions] == pytest.approx([(4 + 2 + 3) / 3, (2 + 6 + 3) / 3, 1.0])
    # pairs (better, worse): row 1: 4>2, 4>1, 2>1; row 2: 2<6; row 3: equal
    assert result["ranked"]["pairs"] == 5
    assert result["ranked"]["longer_preferred"] == pytest.approx(3 / 5)
    assert result["ranked"]["shorter_preferred"] == pytest.approx(1 / 5)
    assert result["outputs"]["tuna"]["count"] == 2 and result["outputs"]["tuna"]["words_mean"] == pytest.approx(2.0)
    assert "tokens_mean" not in positions[0]


def test_token_lengths():
    from tuna_trl.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    texts = [["the quick brown fox", "jumps"], ["over the lazy dog"]]
    positions = length_by_rank(texts, tokenizer)["positions"]
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert positions[0]["tokens_mean"] == pytest.approx((count(texts[0][0]) + count(texts[1][0])) / 2)
    assert positions[1]["tokens_mean"] == count("jumps")


def test_bad_rows_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "p", "completions": [3]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: completions\[0\]"):
        length_bias(str(path))


def test_cli_length_bias(files, tmp_path):
    from tuna_trl.cli import main

    ranked, answers = files
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "length-bias",
                "--ranked",
                ranked,
                "--outputs",
                f"tuna={answers}",
                f"sft={answers}",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "length_bias.json").read_text())
    assert result["ranked"]["rows"] == 3 and set(result["outputs"]) == {"tuna", "sft"}
    assert "| 0 | 3 | 3.00 |" in (out / "length_bias.md").read_text()
    assert (out / "length_bias.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "length-bias", "--outputs", "no-equals-sign", "--output-dir", str(out)]) == 2
