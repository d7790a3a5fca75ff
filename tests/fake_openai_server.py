"""A small OpenAI-compatible HTTP server for tests: /v1/completions, /v1/chat/completions (with log-probs) and
/v1/models, with scriptable faults. Standard library only; run it as a separate process:

    python tests/fake_openai_server.py --config '{"faults": [...]}'

It listens on 127.0.0.1 at a free port and prints `PORT <n>` as its first line. It exits by itself after
`max_requests` requests or `idle_timeout` seconds without one, so a crashed test never leaves it behind.

Config keys (all optional):
    expected_key: requests whose bearer token differs get 401.
    faults: rules tried in order on each request; a rule applies to requests whose prompt contains `match`
        (every request when absent), to the first `times` of them (default: all), and does any of:
        `delay` (seconds before answering), `status` (answer with this error), `retry_after` (Retry-After header).
    no_logprobs_match: prompts containing it get no log-probs.
    request_log: a file receiving one JSON line per answered request (arrival `start` and answer `t` times,
        path, tag, status, temperature).
Judge prompts (containing "### Response 0") get a judge answer ranking responses by length, longest first,
with exact duplicates left out and the judge's own answer first; an instruction containing MALFORMED gets an
answer with no ranking, ECHO an answer that first repeats the "rank: [i, j, ...]" format line, OUTOFRANGE a
ranking with an index out of range.
Prompts containing SAME get the same text for every sample at temperature <= 1 (to trigger resampling).
Error bodies repeat the request's Authorization header, like a careless proxy would: the client must never let
it reach a log or a file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


WORDS = (
    "the a model answer question data river mountain quickly slowly bright dark green blue number seven "
    "twelve reason because therefore however example first second third finally paper method rank sample "
    "token light water stone music garden window city ocean forest simple complex true false good better best"
).split()


class State:
    def __init__(self, config: dict):
        self.config = config
        self.lock = threading.Lock()
        self.requests = 0
        self.last_request = time.monotonic()
        self.rule_hits = [0] * len(config.get("faults", []))
        self.sample_counter = 0

    def next_fault(self, prompt: str) -> dict:
        """The merged actions of the rules that apply to this request (counting it against each)."""
        actions = {}
        with self.lock:
            for k, rule in enumerate(self.config.get("faults", [])):
                if rule.get("match") is not None and rule["match"] not in prompt:
                    continue
                if rule.get("times") is not None and self.rule_hits[k] >= rule["times"]:
                    continue
                self.rule_hits[k] += 1
                for key in ("delay", "status", "retry_after"):
                    if key in rule and key not in actions:
                        actions[key] = rule[key]
        return actions


def _sample_text(prompt: str, index: int, temperature: float, counter: int) -> str:
    if "SAME" in prompt and temperature <= 1.0:
        seed = prompt
    else:
        seed = f"{prompt}|{index}|{temperature}|{counter}"
    rng = random.Random(hashlib.sha256(seed.encode()).hexdigest())
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))


def _token_logprobs(text: str) -> tuple[list[str], list[float]]:
    tokens = [(" " if k else "") + word for k, word in enumerate(text.split())]
    logprobs = [-0.05 - (int(hashlib.md5(t.encode()).hexdigest()[:4], 16) % 300) / 100 for t in tokens]
    return tokens, logprobs


def _judge_answer(prompt: str) -> str:
    instruction = prompt.split("### Instruction", 1)[-1].split("### Response 0", 1)[0]
    responses = re.findall(
        r"### Response (\d+)\n(.*?)(?=\n\n### Response \d+\n|\n\nPlease work through|\Z)", prompt, re.S
    )
    texts = {int(k): text.strip() for k, text in responses}
    n = len(texts)
    if "MALFORMED" in instruction:
        return "All of these responses are fine. I cannot decide between them."
    if "OUTOFRANGE" in instruction:
        return f"Response 0: [9]\nrank: [0, {n + 5}]"
    seen, kept = set(), []
    for k in sorted(texts):
        if texts[k] not in seen:
            seen.add(texts[k])
            kept.append(k)
    order = [n] + sorted(kept, key=lambda k: (-len(texts[k]), k))
    lines = ["The instruction is open-ended.", f"Response {n}: here is my own answer."]
    lines += [f"Response {k}: [{max(0, 15 - rank)}]" for rank, k in enumerate(order)]
    if "ECHO" in instruction:
        lines.insert(0, 'I will finish with "rank: [i, j, ...]" as asked.')
    lines.append(f"rank: [{', '.join(map(str, order))}]")
    return "\n".join(lines)


def make_handler(state: State):
    config = state.config

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: dict, headers: dict | None = None):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _error(self, status: int, message: str, headers=None):
            auth = self.headers.get("Authorization", "")
            body = {
                "error": {"message": f"{message} (request had Authorization: {auth})", "type": "fake", "code": status}
            }
            self._send(status, body, headers)

        def _log(self, tag, status, temperature=None):
            path = config.get("request_log")
            if path:
                with state.lock, open(path, "a") as f:
                    f.write(
                        json.dumps(
                            {
                                "start": self.started,
                                "t": time.time(),
                                "path": self.path,
                                "tag": tag,
                                "status": status,
                                "temperature": temperature,
                            }
                        )
                        + "\n"
                    )

        def _count(self) -> bool:
            with state.lock:
                state.requests += 1
                state.last_request = time.monotonic()
                return state.requests <= config.get("max_requests", 10_000)

        def do_GET(self):
            if not self._count():
                return self._error(503, "request budget exhausted")
            if self.path.rstrip("/").endswith("/models"):
                model = {"id": config.get("model", "fake-model"), "object": "model", "created": 0, "owned_by": "tests"}
                return self._send(200, {"object": "list", "data": [model]})
            self._error(404, f"no route {self.path}")

        def do_POST(self):
            self.started = time.time()
            within_budget = self._count()
            length = int(self.headers.get("Content-Length", 0))
            request = json.loads(self.rfile.read(length) or b"{}")
            if not within_budget:
                return self._error(503, "request budget exhausted")
            expected = config.get("expected_key")
            if expected is not None and self.headers.get("Authorization") != f"Bearer {expected}":
                return self._error(401, "invalid API key")
            chat = self.path.endswith("/chat/completions")
            if chat:
                prompt = "\n".join(m.get("content", "") for m in request.get("messages", []))
            elif self.path.endswith("/completions"):
                prompt = request.get("prompt", "")
            else:
                return self._error(404, f"no route {self.path}")
            tag = re.search(r"\bROW\d+\b", prompt)
            tag = tag.group(0) if tag else ("judge" if "### Response 0" in prompt else "")
            temperature = request.get("temperature", 1.0)
            fault = state.next_fault(prompt)
            if "delay" in fault:
                time.sleep(fault["delay"])
            if "status" in fault:
                self._log(tag, fault["status"], temperature)
                headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else None
                return self._error(fault["status"], "injected fault", headers)
            self._log(tag, 200, temperature)
            self._send(200, self._completion(request, prompt, chat, temperature))

        def _completion(self, request, prompt, chat, temperature):
            n = request.get("n") or 1
            want_logprobs = bool(request.get("logprobs")) and config.get("no_logprobs_match", "\0") not in prompt
            choices, completion_tokens = [], 0
            for index in range(n):
                with state.lock:
                    state.sample_counter += 1
                    counter = state.sample_counter
                if "### Response 0" in prompt:
                    text = _judge_answer(prompt)
                else:
                    text = _sample_text(prompt, index, temperature, counter)
                tokens, logprobs = _token_logprobs(text)
                completion_tokens += len(tokens)
                if chat:
                    choice = {
                        "index": index,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": text},
                    }
                    content = [
                        {"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs)
                    ]
                    choice["logprobs"] = {"content": content} if want_logprobs else None
                else:
                    choice = {"index": index, "finish_reason": "stop", "text": text}
                    choice["logprobs"] = (
                        {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": None}
                        if want_logprobs
                        else None
                    )
                choices.append(choice)
            prompt_tokens = len(prompt.split())
            return {
                "id": f"cmpl-{state.requests}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": request.get("model", "fake-model"),
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }

    return Handler


class FakeServer:
    """Start the server as a subprocess (for tests): `with FakeServer(config) as server: server.base_url`."""

    def __init__(self, config: dict | None = None):
        import subprocess

        self.config = dict(config or {})
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--config", json.dumps(self.config)], stdout=subprocess.PIPE, text=True
        )
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.process.kill()
            raise RuntimeError(f"fake server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> list[dict]:
        """The request log (needs `request_log` in the config)."""
        with open(self.config["request_log"]) as f:
            return [json.loads(line) for line in f]

    def close(self):
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="{}", help="JSON text, or @path to a JSON file")
    args = parser.parse_args(argv)
    text = args.config
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    config = json.loads(text)
    state = State(config)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True

    def watchdog():
        idle_timeout = config.get("idle_timeout", 30.0)
        while True:
            time.sleep(0.05)
            with state.lock:
                idle = time.monotonic() - state.last_request
                exhausted = state.requests > config.get("max_requests", 10_000)
            if idle > idle_timeout or exhausted:
                server.shutdown()
                return

    threading.Thread(target=watchdog, daemon=True).start()
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
