"""A fake pairwise judge behind an OpenAI-compatible chat/completions API, for tests. Standard library only; run
it as its own process (`FakeJudge()` does), it listens on 127.0.0.1 at a free port, prints `PORT <n>` first, and
exits by itself after `--idle-timeout` seconds without a request.

It reads the two answers of `tuna_trl.evaluation.PAIRWISE_JUDGE_PROMPT` and answers like a judge would:
- prefers the answer with more words ("... [[A]]" or "[[B]]"), and says "[[C]]" when they have as many;
- GARBLE in an answer: a judgment with no verdict (must be reported, not guessed);
- FIRSTBIAS in an answer: always "[[A]]", whatever the order (position bias: the two orders disagree);
- ECHO in an answer: first repeats the verdict format "[[A]]", "[[B]]" or "[[C]]", then gives the real verdict;
- FAIL500 in an answer: the first request for that prompt gets HTTP 500 (the client must retry).
GET /stats returns `{"requests": n}`: the judge requests answered so far (500s included).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


_ANSWER_RE = re.compile(
    r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S
)


def judgment(prompt: str) -> str:
    answers = dict(_ANSWER_RE.findall(prompt))
    a, b = answers.get("A", ""), answers.get("B", "")
    if "GARBLE" in a + b:
        return "Both answers have their merits and I cannot choose between them."
    if "FIRSTBIAS" in a + b:
        return "The first answer reads better.\n[[A]]"
    words_a, words_b = len(a.split()), len(b.split())
    verdict = "[[A]]" if words_a > words_b else "[[B]]" if words_b > words_a else "[[C]]"
    lines = [f"Assistant A wrote {words_a} words and Assistant B {words_b}.", verdict]
    if "ECHO" in a + b:
        lines.insert(0, 'I will end with "[[A]]", "[[B]]" or "[[C]]" as asked.')
    return "\n".join(lines)


class Judge(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    lock = threading.Lock()
    requests = 0
    seen_prompts: set = set()
    last_request = time.monotonic()

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        Judge.last_request = time.monotonic()
        self._reply(200, {"requests": Judge.requests})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        chat = self.path.endswith("/chat/completions")
        prompt = "\n".join(m["content"] for m in request.get("messages", [])) if chat else request.get("prompt", "")
        with Judge.lock:
            Judge.requests += 1
            Judge.last_request = time.monotonic()
            first_time = prompt not in Judge.seen_prompts
            Judge.seen_prompts.add(prompt)
        if "FAIL500" in prompt and first_time:
            return self._reply(500, {"error": {"message": "injected failure", "type": "server_error", "code": 500}})
        text = judgment(prompt)
        choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        kind = "chat.completion" if chat else "text_completion"
        self._reply(
            200,
            {
                "id": "judge",
                "object": kind,
                "created": 0,
                "model": request.get("model"),
                "choices": [choice],
                "usage": usage,
            },
        )


class FakeJudge:
    """`with FakeJudge() as judge: judge.base_url` starts the server in a subprocess and stops it afterwards."""

    def __init__(self, idle_timeout: float = 30.0):
        import subprocess

        command = [sys.executable, __file__, "--idle-timeout", str(idle_timeout)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.process.kill()
            raise RuntimeError(f"the fake judge did not start: {line!r}")
        self.base_url = f"http://127.0.0.1:{int(line.split()[1])}/v1"

    def requests(self) -> int:
        import urllib.request

        with urllib.request.urlopen(self.base_url + "/stats", timeout=10) as response:
            return json.load(response)["requests"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--idle-timeout", type=float, default=30.0, help="Exit after this many seconds without a request."
    )
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    server.daemon_threads = True

    def exit_when_idle():
        while time.monotonic() - Judge.last_request < args.idle_timeout:
            time.sleep(0.1)
        server.shutdown()

    threading.Thread(target=exit_when_idle, daemon=True).start()
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
