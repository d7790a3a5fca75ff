"""`OpenAIBackend` against a real local HTTP server process (tests/fake_openai_server.py) with injected faults."""

import logging
import time

import pytest
from fake_openai_server import FakeServer

from tuna_trl.generation import BackendConfigError, BackendError, MissingLogprobsError, OpenAIBackend, track_usage


KEY = "sk-tuna-FAKE-KEY-7f3a9c1e5b"


@pytest.fixture(autouse=True)
def api_key(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    yield
    assert KEY not in caplog.text  # not in any log record, the openai client's debug logs included


def _backend(server, **kwargs):
    options = dict(base_url=server.base_url, backoff_initial=0.01, backoff_max=0.05, timeout=5.0)
    return OpenAIBackend("fake-model", **{**options, **kwargs})


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_samples_with_logprobs_and_usage(api):
    with FakeServer({"expected_key": KEY}) as server, _backend(server, api=api) as backend:
        with track_usage() as usage:
            out = backend.generate(["first ROW0", "second ROW1"], n=3, temperature=0.7, logprobs=True)
        assert [len(samples) for samples in out] == [3, 3]
        for sample in (s for samples in out for s in samples):
            assert sample.text and len(sample.token_logprobs) == len(sample.text.split())
            assert all(lp < 0 for lp in sample.token_logprobs) and sample.finish_reason == "stop"
        assert usage.prompt_tokens == 4 and usage.completion_tokens == sum(len(s.text.split()) for r in out for s in r)
        assert backend.usage.total_tokens == usage.total_tokens
        assert backend.generate(["x"], n=1, logprobs=False)[0][0].token_logprobs is None


def test_429_retry_waits_for_retry_after(tmp_path):
    log = str(tmp_path / "requests.jsonl")
    config = {"request_log": log, "faults": [{"match": "ROW1", "times": 2, "status": 429, "retry_after": "0.4"}]}
    with FakeServer(config) as server, _backend(server) as backend:
        out = backend.generate(["ROW0", "ROW1"], n=1, logprobs=True)
        assert len(out[1]) == 1
        times = [r["t"] for r in server.requests() if r["tag"] == "ROW1"]
    assert [r["status"] for r in server.requests() if r["tag"] == "ROW1"] == [429, 429, 200]
    # backoff alone would be <= 0.05 s: the gaps come from Retry-After
    assert all(later - earlier >= 0.38 for earlier, later in zip(times, times[1:]))


def test_5xx_retried_then_given_up_without_leaking_the_key():
    config = {"faults": [{"match": "ROW0", "times": 2, "status": 500}, {"match": "ROW1", "status": 503}]}
    with FakeServer(config) as server, _backend(server, max_retries=3) as backend:
        assert backend.generate(["ROW0"], logprobs=True)[0][0].text
        with pytest.raises(BackendError) as info:
            backend.generate(["ROW1"], logprobs=True)
    error = info.value
    assert error.status_code == 503 and "after retries" in str(error)
    assert "***" in str(error) and KEY not in str(error)  # the server echoed the Authorization header
    assert error.__cause__ is None and error.__suppress_context__


def test_slow_answer_times_out_and_is_retried():
    config = {"faults": [{"match": "ROW0", "times": 1, "delay": 2.0}]}
    with FakeServer(config) as server, _backend(server, timeout=0.5) as backend:
        started = time.monotonic()
        assert backend.generate(["ROW0"], logprobs=True)[0][0].text
        assert time.monotonic() - started < 1.9


def test_concurrency_is_bounded(tmp_path):
    config = {"request_log": str(tmp_path / "requests.jsonl"), "faults": [{"delay": 0.3}]}
    with FakeServer(config) as server, _backend(server, max_concurrency=2) as backend:
        backend.generate([f"ROW{i}" for i in range(6)], logprobs=False)
        spans = [(r["start"], r["t"]) for r in server.requests()]
    in_flight = max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)
    assert len(spans) == 6 and in_flight == 2


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_missing_logprobs_is_a_clear_error(api):
    with FakeServer({"no_logprobs_match": "ROW"}) as server, _backend(server, api=api) as backend:
        with pytest.raises(MissingLogprobsError) as info:
            backend.generate(["ROW0"], logprobs=True)
        assert backend.generate(["ROW0"], logprobs=False)[0][0].text
    message = str(info.value)
    assert "fake-model" in message and server.base_url in message and "Probabilistic ranking needs" in message


def test_wrong_key_is_a_config_error(monkeypatch):
    with FakeServer({"expected_key": "another-key-entirely"}) as server, _backend(server) as backend:
        with pytest.raises(BackendConfigError, match="HTTP 401") as info:
            backend.generate(["ROW0"])
    assert KEY not in str(info.value) and KEY not in repr(backend)


def test_no_key_and_no_base_url_is_refused(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(BackendConfigError, match="OPENAI_API_KEY"):
        OpenAIBackend("gpt-x")
