"""Proxy ranking model: the collator, the agreement metric, training that beats chance, rerank and the judge."""

import json
import random

import pytest
import torch

from tuna_trl.prm import PRMCollator, pair_agreement


WORDS = ["good", "cat", "sun", "tree", "blue", "ship", "rain", "lamp"]


def judged_rows(num_rows: int, seed: int) -> list[dict]:
    """A judge that likes the word 'good': each row has 4 completions with 0-3 'good's, ranked by that count."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        completions = []
        for goods in rng.sample(range(4), 4):
            words = ["good"] * goods + [rng.choice(WORDS[1:]) for _ in range(4 - goods)]
            rng.shuffle(words)
            completions.append((goods, " ".join(words)))
        completions.sort(key=lambda c: -c[0])
        rows.append({
            "id": i,
            "prompt": f"Question {rng.randrange(100)}: say something.\n",
            "completions": [text for _, text in completions],
            "scores": [float(goods) for goods, _ in completions],
        })
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # as in test_pipeline.py: one thread is much faster for tiny models on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tuna_trl.tiny import save_tiny

    path = tmp_path_factory.mktemp("tiny-lm")
    corpus = [" ".join(WORDS)] * 20 + ["Question : say something."] * 20
    return save_tiny(str(path), corpus=corpus, hidden_size=32, num_hidden_layers=2, max_position_embeddings=64)


def test_collator_layout():
    batch = PRMCollator(pad_token_id=0)(
        [
            {"prompt_ids": [1, 5], "completion_ids": [[7, 2], [8, 9, 2]], "judge_scores": [2.0, 1.0]},
            {"prompt_ids": [1], "completion_ids": [[4, 2]]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 5, 7, 2, 0], [1, 5, 8, 9, 2], [1, 4, 2, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [4, 5, 3]
    assert batch["score_index"].tolist() == [[0, 1], [2, -1]]
    assert batch["num_completions"].tolist() == [2, 1]
    assert batch["judge_scores"][0].tolist() == [2.0, 1.0] and torch.isnan(batch["judge_scores"][1]).all()


def test_pair_agreement_counts_pairs_and_skips_ties():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 0.0]])
    num = torch.tensor([3, 2])
    # row 0: (0,1) yes, (0,2) yes, (1,2) no; row 1: (0,1) no
    assert pair_agreement(scores, num) == (2, 4)
    judge = torch.tensor([[2.0, 1.0, 1.0], [1.0, 0.0, float("nan")]])
    assert pair_agreement(scores, num, judge) == (2, 3)  # the tied pair (1,2) of row 0 is left out


def test_prm_learns_the_judge_and_reranks(tiny_lm, tmp_path):
    from tuna_trl.cli import main
    from tuna_trl.generation.runner import read_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", judged_rows(160, seed=0))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", judged_rows(40, seed=1))
    out = tmp_path / "prm"
    code = main([
        "prm", "train", "--data", train, "--eval-data", heldout, "--model", tiny_lm, "--output-dir", str(out),
        "--learning-rate", "3e-3", "--epochs", "4", "--batch-size", "8", "--seed", "0",
        "--training", "use_cpu=true", "--training", "logging_steps=100",
    ])
    assert code == 0
    metrics = json.loads((out / "prm_metrics.json").read_text())
    # chance is 0.5; the untrained head is about there, the trained PRM well above
    assert metrics["eval_agreement"] > 0.8, metrics
    assert metrics["eval_agreement"] > metrics["initial_eval_agreement"] + 0.2, metrics

    # rerank a shuffled copy of the held-out rows: the PRM puts them back in (about) the judge's order
    rows = judged_rows(40, seed=1)
    rng = random.Random(0)
    for row in rows:
        order = list(range(4))
        rng.shuffle(order)
        row["completions"] = [row["completions"][i] for i in order]
        row.pop("scores")
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows)
    reranked = tmp_path / "reranked.jsonl"
    assert main(["prm", "rerank", "--prm", str(out), "--input", shuffled, "--output", str(reranked), "--no-progress"]) == 0
    result = read_jsonl(str(reranked))
    assert [r["id"] for r in result] == list(range(40))
    for row in result:
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert sorted(row["meta"]["prm_order"]) == [0, 1, 2, 3]
    goods = [[c.split().count("good") for c in row["completions"]] for row in result]
    agree = sum(g[j] > g[k] for g in goods for j in range(4) for k in range(j + 1, 4))
    assert agree / (40 * 6) > 0.8
    # a rerun with the same output skips every row
    assert main(["prm", "rerank", "--prm", str(out), "--input", shuffled, "--output", str(reranked), "--no-progress"]) == 0
    assert len(read_jsonl(str(reranked))) == 40

    # the PRM as a contextual judge: the judge interface, best first
    from tuna_trl.prm import PRMJudge

    judge = PRMJudge(str(out), prompt_fn=lambda instruction, input: instruction)
    verdict = judge("Question 7: say something.\n", ["cat sun tree blue", "good good good cat"])
    assert verdict.model_ranking() == [1, 0]
    assert set(verdict.scores) == {0, 1}


def test_train_rejects_bad_rows(tiny_lm, tmp_path):
    from tuna_trl.prm import PRMConfig, train_prm

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completions": []}) + "\n")
    with pytest.raises(ValueError, match="completions"):
        train_prm(tiny_lm, [str(bad)], PRMConfig(output_dir=str(tmp_path / "o"), use_cpu=True), eval_fraction=0)
