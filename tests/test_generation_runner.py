"""The generation runner and CLI end to end against a real local server process: faults, errors file, resume after
kill -9, no key anywhere."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from fake_openai_server import FakeServer

from tuna_trl.generation import InputError, ResumableJsonl, read_instructions
from tuna_trl.generation.cli import main as generate_main
from tuna_trl.generation.runner import errors_path, read_jsonl


KEY = "sk-tuna-FAKE-KEY-b41d2e9a77"
FAST_RETRIES = ["--backoff-initial", "0.01", "--backoff-max", "0.05", "--timeout", "1.0", "--no-progress"]


@pytest.fixture(autouse=True)
def api_key(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)


def _write_alpaca(path, count, special=None):
    special = special or {}
    rows = [
        {
            "instruction": f"Say something about item ROW{i:03d} {special.get(i, '')}".strip(),
            "input": "",
            "output": f"gold {i}",
        }
        for i in range(count)
    ]
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _assert_no_key(*texts_and_paths):
    for item in texts_and_paths:
        text = open(item).read() if os.path.exists(str(item)) else str(item)
        assert KEY not in text


def _ids(path):
    return [row["id"] for row in read_jsonl(path)] if os.path.exists(path) else []


def test_probabilistic_with_faults_then_rerun_retries_the_failures(tmp_path, capsys, caplog):
    from tuna_trl.cli import main as tuna_main

    data = _write_alpaca(tmp_path / "alpaca.jsonl", 24)
    output = str(tmp_path / "out" / "ranked.jsonl")
    faults = [
        {"match": "ROW003", "times": 2, "status": 429, "retry_after": "0.2"},
        {"match": "ROW005", "status": 500},  # fails for good in the first run
        {"match": "ROW007", "times": 1, "delay": 1.5},  # times out once
        {"match": "ROW011", "times": 1, "status": 502},
    ]
    args = [
        "generate",
        "probabilistic",
        "--input",
        data,
        "--output",
        output,
        "--teacher-model",
        "fake-model",
        "--n",
        "3",
        "--concurrency",
        "4",
        "--max-retries",
        "2",
        "--price-per-1k-tokens",
        "0.5",
        *FAST_RETRIES,
    ]
    with FakeServer({"expected_key": KEY, "faults": faults}) as server:
        code = tuna_main([*args, "--base-url", server.base_url])
    assert code == 3  # finished with failed rows
    first = capsys.readouterr()
    errors = read_jsonl(errors_path(output))
    assert [(e["id"], e["stage"]) for e in errors] == [(5, "generate")] and "HTTP 500" in errors[0]["reason"]
    assert sorted(_ids(output)) == [i for i in range(24) if i != 5]
    assert "23 rows written" in first.out and "1 rows failed" in first.out and "estimated cost" in first.out

    rows = read_jsonl(output)
    for row in rows:
        assert row["scores"] == sorted(row["scores"], reverse=True) and len(row["completions"]) == 3
        assert row["reference"] == f"gold {row['id']}" and row["prompt"].startswith("Below is an instruction")
        assert row["meta"]["teacher"] == "fake-model" and row["meta"]["usage"]["total_tokens"] > 0

    with FakeServer({"expected_key": KEY}) as server:
        code = tuna_main([*args, "--base-url", server.base_url])
    second = capsys.readouterr()
    assert code == 0 and "1 rows written" in second.out and "(23 of 24 already done" in second.out
    assert sorted(_ids(output)) == list(range(24))
    assert read_jsonl(errors_path(output)) == [] and os.path.exists(output + ".errors.prev.jsonl")
    _assert_no_key(
        output,
        errors_path(output),
        output + ".errors.prev.jsonl",
        first.out + first.err,
        second.out + second.err,
        caplog.text,
    )

    import datasets

    dataset = datasets.load_dataset("json", data_files=output, split="train")
    assert dataset.num_rows == 24 and {"prompt", "completions", "reference"} <= set(dataset.column_names)


def test_contextual_over_http_with_bad_judge_answers(tmp_path, capsys, caplog):
    special = {1: "MALFORMED", 2: "ECHO", 3: "OUTOFRANGE", 4: "SAME"}
    data = _write_alpaca(tmp_path / "alpaca.jsonl", 8, special)
    output = str(tmp_path / "ranked.jsonl")
    with FakeServer({"expected_key": KEY}) as server:
        code = generate_main(
            [
                "contextual",
                "--input",
                data,
                "--output",
                output,
                "--policy-model",
                server.base_url,
                "--judge-model",
                "fake-judge",
                "--judge-base-url",
                server.base_url,
                "--n",
                "4",
                "--concurrency",
                "3",
                *FAST_RETRIES,
            ]
        )
    out = capsys.readouterr()
    assert code == 3
    errors = {e["id"]: e for e in read_jsonl(errors_path(output))}
    assert set(errors) == {1, 3}
    assert errors[1]["stage"] == "judge" and "no 'rank" in errors[1]["reason"] and "cannot decide" in errors[1]["raw"]
    assert "out of range" in errors[3]["reason"] and "rank: [0, 9]" in errors[3]["raw"]
    rows = {row["id"]: row for row in read_jsonl(output)}
    assert sorted(rows) == [0, 2, 4, 5, 6, 7]
    for row in rows.values():  # the fake judge ranks longest first
        assert [len(c) for c in row["completions"]] == sorted(map(len, row["completions"]), reverse=True)
        assert row["meta"]["policy"] == "fake-model" and row["meta"]["judge"] == "fake-judge"
        assert row["meta"]["judge_ranking"][0] == 4  # the judge's own answer, left out of the completions
    assert rows[4]["meta"]["trials"] > 0 and max(rows[4]["meta"]["temperatures"]) > 1.0
    _assert_no_key(output, errors_path(output), out.out + out.err, caplog.text)


@pytest.fixture
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core machine: see test_generation_transformers.py
    yield
    torch.set_num_threads(threads)


def test_contextual_with_a_local_policy(tmp_path, capsys, one_torch_thread):
    from tuna_trl.tiny import save_tiny

    model_dir = save_tiny(str(tmp_path / "policy"))
    data = _write_alpaca(tmp_path / "alpaca.jsonl", 5)
    output = str(tmp_path / "ranked.jsonl")
    with FakeServer({"expected_key": KEY}) as server:
        code = generate_main(
            [
                "contextual",
                "--input",
                data,
                "--output",
                output,
                "--policy-model",
                model_dir,
                "--judge-model",
                "judge",
                "--judge-base-url",
                server.base_url,
                "--n",
                "3",
                "--batch-size",
                "6",
                "--max-new-tokens",
                "8",
                *FAST_RETRIES,
            ]
        )
    capsys.readouterr()
    done = _ids(output) + [e["id"] for e in read_jsonl(errors_path(output))]
    assert code in (0, 3) and sorted(done) == list(range(5))
    assert all(row["meta"]["policy"] == model_dir for row in read_jsonl(output))


def _generator(data, output, base_url):
    command = [
        sys.executable,
        "-m",
        "tuna_trl.generation.cli",
        "probabilistic",
        "--input",
        data,
        "--output",
        output,
        "--teacher-model",
        "fake-model",
        "--base-url",
        base_url,
        "--concurrency",
        "3",
        "--n",
        "2",
        *FAST_RETRIES,
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def test_kill_9_then_rerun_gives_every_id_exactly_once(tmp_path):
    count = 80
    data = _write_alpaca(tmp_path / "alpaca.jsonl", count)
    output = str(tmp_path / "ranked.jsonl")
    with FakeServer({"expected_key": KEY, "faults": [{"delay": 0.05}]}) as server:
        for kill_after in (8, 25):
            process = _generator(data, output, server.base_url)
            deadline = time.monotonic() + 60
            while len(_ids(output)) < kill_after and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.communicate()
            assert process.returncode == -signal.SIGKILL
        assert 25 <= len(_ids(output)) < count
        with open(output, "a") as f:  # as if the kill had landed in the middle of a write
            f.write('{"id": 79, "prompt": "torn')
        process = _generator(data, output, server.base_url)
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert "discarded a torn last line" in stderr.decode()
    ids = _ids(output)
    assert sorted(ids) == list(range(count))  # each id exactly once
    _assert_no_key(output, stdout.decode() + stderr.decode())


def test_fatal_backend_error_stops_the_run(tmp_path, capsys):
    data = _write_alpaca(tmp_path / "alpaca.jsonl", 10)
    output = str(tmp_path / "ranked.jsonl")
    with FakeServer({"no_logprobs_match": "ROW"}) as server:
        code = generate_main(
            [
                "probabilistic",
                "--input",
                data,
                "--output",
                output,
                "--teacher-model",
                "fake-model",
                "--base-url",
                server.base_url,
                "--concurrency",
                "2",
                *FAST_RETRIES,
            ]
        )
    err = capsys.readouterr().err
    assert code == 1 and "needs the teacher's token log-probs" in err and "fake-model" in err
    assert _ids(output) == [] and read_jsonl(errors_path(output)) == []


def test_torn_last_line_is_cut_off_before_appending(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 0, "x": 1}\n{"id": "1", "x": 2}\n{"id": 2, "x"')
    writer = ResumableJsonl(str(path))
    assert writer.discarded_bytes == len('{"id": 2, "x"') and writer.done == {"0", '"1"'}
    writer.write({"id": 2, "x": 3})
    writer.close()
    assert [row["id"] for row in read_jsonl(str(path))] == [0, "1", 2]
    path.write_text('{"id": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not valid JSON"):
        ResumableJsonl(str(path))


def test_inputs_alpaca_json_prompt_rows_and_errors_with_file_and_line(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(
        json.dumps(
            [
                {"instruction": "Add.", "input": "2 and 3", "output": "5"},
                {"instruction": "Say hi.", "input": "", "output": "hi"},
            ],
            indent=2,
        )
    )
    rows = read_instructions(str(alpaca))
    assert rows[0].prompt.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert rows[1].prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and rows[1].reference == "hi"
    assert [r.line for r in rows] == [2, 7] and [r.id for r in rows] == [0, 1]
    assert read_instructions(str(alpaca), prompt_template="none")[0].prompt == "Add.\n\n2 and 3"
    assert len(read_instructions(str(alpaca), limit=1)) == 1

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Q?", "reference": "A."}\n\n{"id": "b", "prompt": "R?"}\n')
    rows = read_instructions(str(prompts))
    assert [(r.id, r.prompt, r.reference, r.line) for r in rows] == [("a", "Q?", "A.", 1), ("b", "R?", None, 3)]

    cases = {
        '{"instruction": "ok"}\n{"instruction": "bad"\n': "bad.jsonl:2: not valid JSON",
        '{"instruction": "ok"}\n{"text": "what"}\n': "bad.jsonl:2: a record needs either 'prompt' or 'instruction'",
        '{"instruction": 3}\n': "bad.jsonl:1: field 'instruction' must be a string",
        '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n': "bad.jsonl:2: id 1 repeats the id of line 1",
        '[{"instruction": "ok"},\n 7]': "bad.jsonl:2: each record must be a JSON object",
        '[{"instruction": "ok"}\n {"instruction": "no comma"}]': "bad.jsonl:2: expected ','",
    }
    for text, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(InputError, match=message):
            read_instructions(str(tmp_path / "bad.jsonl"))


def test_cli_bad_input_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"instruction": \n')
    code = generate_main(
        [
            "probabilistic",
            "--input",
            str(bad),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--teacher-model",
            "m",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--no-progress",
        ]
    )
    assert code == 2 and f"{bad}:2: not valid JSON" in capsys.readouterr().err
    code = generate_main(
        [
            "contextual",
            "--input",
            _write_alpaca(tmp_path / "a.jsonl", 1),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--policy-model",
            "no/such/dir",
            "--judge-model",
            "j",
        ]
    )
    assert code == 2 and "neither a local directory nor an http(s) URL" in capsys.readouterr().err
