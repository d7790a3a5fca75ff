"""`OpenAIBackend`: samples (with token log-probs) from any OpenAI-compatible endpoint: OpenAI itself, `vllm serve`,
`transformers serve`, ...

Requests run concurrently on one `AsyncOpenAI` client owned by a private event-loop thread, so `generate` stays a
plain blocking call that many worker threads can share, with one connection pool and one concurrency limit.
Retries are ours (tenacity) and the client's own are off, so that there is exactly one retry policy: 429, 408, 409,
5xx, timeouts and connection errors are retried with exponential backoff and full jitter, never sooner than the
server's `Retry-After`.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import threading
import time

from .sample import (
    BackendConfigError,
    BackendError,
    MissingLogprobsError,
    Sample,
    Usage,
    current_usage_scopes,
    record_usage,
    redact,
    register_secret,
)


logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 429}
_FATAL_STATUS = {401, 403, 404}  # the same answer would come back for every row


def retry_after_seconds(headers) -> float | None:
    """Seconds the server asks us to wait (`retry-after-ms`, or `Retry-After` as seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _is_retryable(error: BaseException) -> bool:
    import openai

    if isinstance(error, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in _RETRY_STATUS or error.status_code >= 500
    return False


class _WaitBackoffOrRetryAfter:
    """tenacity wait: exponential backoff with full jitter, but at least the server's Retry-After (capped)."""

    def __init__(self, initial: float, maximum: float, max_retry_after: float):
        from tenacity import wait_random_exponential

        self.backoff = wait_random_exponential(multiplier=initial, max=maximum)
        self.max_retry_after = max_retry_after

    def __call__(self, retry_state) -> float:
        wait = self.backoff(retry_state)
        response = getattr(retry_state.outcome.exception(), "response", None)
        asked = retry_after_seconds(getattr(response, "headers", None))
        return wait if asked is None else max(wait, min(asked, self.max_retry_after))


class OpenAIBackend:
    """Sample from an OpenAI-compatible endpoint.

    Args:
        model: the model name the endpoint serves.
        base_url: e.g. `http://localhost:8000/v1` for `vllm serve`; None for api.openai.com.
        api: `"completions"` (the prompt is sent as is; needed for log-probs on most servers) or `"chat"` (the
            prompt becomes one user message).
        max_concurrency: requests in flight at once, over all threads using this backend.
        timeout: seconds for one request before it counts as failed (and is retried).
        max_retries: retries after the first attempt.
        api_key_env: the environment variable holding the key. When it is unset and `base_url` is given, a
            placeholder key is sent (local servers usually need none). The key is never logged or written.
        backoff_initial, backoff_max: seconds; the n-th retry waits uniform(0, min(backoff_max,
            backoff_initial * 2**n)), and at least the server's Retry-After (up to `max_retry_after`).
        extra_body: extra JSON fields for every request (e.g. `{"top_k": -1}` for vLLM).

    Token usage of all requests is summed in `self.usage`.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api: str = "completions",
        max_concurrency: int = 16,
        timeout: float = 120.0,
        max_retries: int = 8,
        api_key_env: str = "OPENAI_API_KEY",
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        max_retry_after: float = 300.0,
        extra_body: dict | None = None,
    ):
        if api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {api!r}")
        api_key = os.environ.get(api_key_env)
        if not api_key:
            if base_url is None:
                raise BackendConfigError(
                    f"No API key: set the environment variable {api_key_env} (or pass base_url for a local server)."
                )
            api_key = "no-key-needed"
        register_secret(api_key)
        self.model = model
        self.base_url = base_url
        self.api = api
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.extra_body = extra_body
        self.usage = Usage()
        self.name = model
        self._api_key = api_key
        self._wait = _WaitBackoffOrRetryAfter(backoff_initial, backoff_max, max_retry_after)
        self._loop = None
        self._client = None
        self._semaphore = None
        self._start_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return self.base_url or "https://api.openai.com/v1"

    def __repr__(self) -> str:  # the key is deliberately not part of it
        return f"OpenAIBackend(model={self.model!r}, base_url={self.endpoint!r}, api={self.api!r})"

    # -- the private event loop ------------------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                from openai import AsyncOpenAI

                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="tuna-openai-loop", daemon=True).start()
                self._client = AsyncOpenAI(
                    api_key=self._api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0
                )
                self._semaphore = asyncio.Semaphore(self.max_concurrency)
                self._loop = loop
        return self._loop

    def close(self) -> None:
        """Close the HTTP client and stop the event-loop thread (also done at interpreter exit)."""
        loop, self._loop = self._loop, None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._client.close(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def served_models(self) -> list[str]:
        """The model names the endpoint lists under /models."""

        async def names():
            try:
                return [model.id async for model in self._client.models.list()]
            except Exception as error:  # noqa: BLE001 -- re-raised without the original (key-bearing) chain
                raise self._as_backend_error(error) from None

        return asyncio.run_coroutine_threadsafe(names(), self._ensure_loop()).result()

    # -- requests --------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        n: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        logprobs: bool = False,
    ) -> list[list[Sample]]:
        """`n` samples per prompt, one request per prompt, up to `max_concurrency` requests in flight.

        Raises:
            BackendError: a request still failed after the retries (or failed in a way a retry cannot fix).
            BackendConfigError: the key, the model or the endpoint is wrong (401/403/404).
            MissingLogprobsError: `logprobs=True` and the endpoint returned none.
        """
        loop = self._ensure_loop()
        scopes = current_usage_scopes()  # captured here: the coroutines run on another thread
        coroutine = self._generate_all(list(prompts), n, temperature, max_new_tokens, logprobs, scopes)
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    async def _generate_all(self, prompts, n, temperature, max_new_tokens, logprobs, scopes):
        tasks = [self._generate_one(p, n, temperature, max_new_tokens, logprobs, scopes) for p in prompts]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _generate_one(self, prompt, n, temperature, max_new_tokens, logprobs, scopes) -> list[Sample]:
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    async with self._semaphore:
                        response = await self._request(prompt, n, temperature, max_new_tokens, logprobs)
        except Exception as error:  # noqa: BLE001 -- turned into our own error without the original (key-bearing) chain
            raise self._as_backend_error(error) from None
        usage = response.usage
        prompt_tokens = getattr(usage, "prompt_tokens", 0) or 0
        completion_tokens = getattr(usage, "completion_tokens", 0) or 0
        record_usage((self.usage, *scopes), prompt_tokens, completion_tokens)
        return self._samples(response, logprobs)

    async def _request(self, prompt, n, temperature, max_new_tokens, logprobs):
        # optional fields are left out rather than sent as null, which some servers reject
        common = {"model": self.model, "n": n, "temperature": temperature}
        if self.extra_body:
            common["extra_body"] = self.extra_body
        if self.api == "completions":
            if logprobs:
                common["logprobs"] = 1  # the sampled token's log-prob comes with the top-1 list
            return await self._client.completions.create(prompt=prompt, max_tokens=max_new_tokens, **common)
        if logprobs:
            common["logprobs"] = True
        # api.openai.com has deprecated `max_tokens` for chat (reasoning models refuse it); other servers know it best
        common["max_completion_tokens" if self.base_url is None else "max_tokens"] = max_new_tokens
        return await self._client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)

    def _samples(self, response, logprobs: bool) -> list[Sample]:
        samples = []
        for choice in sorted(response.choices, key=lambda c: c.index):
            if self.api == "completions":
                text = choice.text
                token_logprobs = choice.logprobs.token_logprobs if choice.logprobs is not None else None
            else:
                text = choice.message.content or ""
                content = choice.logprobs.content if choice.logprobs is not None else None
                token_logprobs = [t.logprob for t in content] if content is not None else None
            if logprobs and (token_logprobs is None or any(lp is None for lp in token_logprobs)):
                raise MissingLogprobsError(
                    f"The {self.api} endpoint {self.endpoint} (model {self.model!r}) returned no token log-probs. "
                    "Probabilistic ranking needs the teacher's token log-probs: use a server and API that return "
                    "them (e.g. `vllm serve` with --api completions), or a local model (TransformersBackend)."
                )
            samples.append(Sample(text, list(token_logprobs) if logprobs else None, choice.finish_reason or "stop"))
        return samples

    def _log_retry(self, retry_state) -> None:
        error = retry_state.outcome.exception()
        logger.warning(
            "%s from %s (model %s); retry %d/%d in %.2fs",
            _describe(error),
            self.endpoint,
            self.model,
            retry_state.attempt_number,
            self.max_retries,
            retry_state.next_action.sleep if retry_state.next_action else 0.0,
        )

    def _as_backend_error(self, error: BaseException) -> BackendError:
        if isinstance(error, BackendError):
            return error
        status = getattr(error, "status_code", None)
        where = f"{self.endpoint} (model {self.model!r})"
        if status in _FATAL_STATUS:
            hint = {
                401: "check the API key variable",
                403: "the key may lack access",
                404: "check --base-url and the model name",
            }
            return BackendConfigError(f"{_describe(error)} from {where}: {hint[status]}.", status_code=status)
        retried = " after retries" if _is_retryable(error) else ""
        return BackendError(
            f"{_describe(error)} from {where}{retried}: {redact(str(error))[:500]}", status_code=status
        )


def _describe(error: BaseException) -> str:
    status = getattr(error, "status_code", None)
    return f"HTTP {status}" if status is not None else type(error).__name__
