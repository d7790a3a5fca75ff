"""What every generation backend returns and shares: `Sample`, token-usage accounting, errors, secret redaction."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class Sample:
    """One sampled completion.

    Attributes:
        text: the completion text, without the prompt and without the end-of-sequence token.
        token_logprobs: natural-log probability of each sampled token under the model (length = number of
            completion tokens; for `TransformersBackend` this includes the EOS token when the sample ended with
            one), or None when log-probs were not requested.
        finish_reason: `"stop"` (EOS or a stop sequence) or `"length"` (hit `max_new_tokens`), as the API says.
        token_ids: the sampled token ids when the backend knows them (local models), else None.
    """

    text: str
    token_logprobs: list[float] | None = None
    finish_reason: str = "stop"
    token_ids: list[int] | None = None


@runtime_checkable
class Backend(Protocol):
    """The one interface of `OpenAIBackend`, `TransformersBackend` and any backend you write.

    `generate` returns one list per prompt, each with `n` samples, in prompt order.
    """

    name: str

    def generate(
        self,
        prompts: list[str],
        n: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        logprobs: bool = False,
    ) -> list[list[Sample]]: ...


class BackendError(RuntimeError):
    """A request still failed after all retries (or cannot succeed). Its message never contains the API key."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(redact(message))
        self.status_code = status_code


class BackendConfigError(BackendError):
    """The backend cannot work for any row (bad key, unknown model, no log-probs): the run stops instead of
    filling the errors file with the same failure for every row."""


class MissingLogprobsError(BackendConfigError):
    """Log-probs were requested but the endpoint returned none."""


# ----------------------------------------------------------------------------------------------------------------------
# Token usage. Backends add to their own running total and to every `track_usage()` scope open in the calling
# thread, so that a row's usage can be recorded even when many rows share one backend concurrently.


@dataclass
class Usage:
    """Token counts; safe to add to from several threads."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.requests += requests

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


_USAGE_SCOPES: contextvars.ContextVar[tuple[Usage, ...]] = contextvars.ContextVar("tuna_usage_scopes", default=())


@contextlib.contextmanager
def track_usage():
    """Collect the tokens of every backend call made by this thread inside the `with` block.

    >>> with track_usage() as usage:
    ...     pass  # backend.generate(...)
    >>> usage.total_tokens
    0
    """
    usage = Usage()
    token = _USAGE_SCOPES.set(_USAGE_SCOPES.get() + (usage,))
    try:
        yield usage
    finally:
        _USAGE_SCOPES.reset(token)


def current_usage_scopes() -> tuple[Usage, ...]:
    """The open `track_usage()` scopes of the calling thread (backends capture them before going async)."""
    return _USAGE_SCOPES.get()


def record_usage(targets, prompt_tokens: int, completion_tokens: int) -> None:
    for usage in targets:
        usage.add(prompt_tokens, completion_tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Secret redaction. A server may echo the Authorization header back in an error body, and exception texts end up in
# the errors file and the logs, so every text that leaves the process through us goes through `redact`.

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()


def register_secret(secret: str | None) -> None:
    """Make `redact` replace `secret` wherever it appears (secrets shorter than 8 characters are not worth hiding
    and would mangle ordinary text)."""
    if secret and len(secret) >= 8:
        with _SECRETS_LOCK:
            _SECRETS.add(secret)


def redact(text: str) -> str:
    """`text` with every registered secret replaced by `***`."""
    text = str(text)
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text
