"""Run a ranker over many instructions: concurrent, resumable, with an errors file, a progress bar and a summary."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from .inputs import Instruction
from .jsonl import ResumableJsonl, id_key
from .rankers import RowFailure
from .sample import BackendConfigError, Usage, redact, track_usage


logger = logging.getLogger(__name__)


def errors_path(output: str) -> str:
    """`<output>.errors.jsonl`, where the rows that failed go."""
    return f"{output}.errors.jsonl"


@dataclass
class RunSummary:
    """What a run did. `cost` is None when no price was given; token counts are this run's only."""

    total: int
    skipped: int
    written: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    seconds: float
    output: str
    errors_file: str

    def format(self) -> str:
        written = f"{self.written} rows written to {self.output} in {self.seconds:.1f}s"
        already = f"({self.skipped} of {self.total} already done before this run)"
        failed = f"{self.errors} rows failed" + (f": see {self.errors_file} (a rerun retries them)" if self.errors else "")
        tokens = self.prompt_tokens + self.completion_tokens
        lines = [
            f"{written} {already}",
            failed,
            f"tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion = {tokens}",
        ]
        if self.cost is not None:
            lines.append(f"estimated cost: {self.cost:.4f} (at the given price per 1K tokens)")
        return "\n".join(lines)


def estimate_cost(
    usage: Usage, price_per_1k: float | None, completion_price_per_1k: float | None = None
) -> float | None:
    """Cost of `usage` at `price_per_1k` per 1,000 tokens (completion tokens at `completion_price_per_1k` when
    given); None when no price is given."""
    if price_per_1k is None and completion_price_per_1k is None:
        return None
    prompt_price = price_per_1k or 0.0
    completion_price = completion_price_per_1k if completion_price_per_1k is not None else prompt_price
    return (usage.prompt_tokens * prompt_price + usage.completion_tokens * completion_price) / 1000


def _start_errors_file(path: str) -> ResumableJsonl:
    # Every id in it is retried by this run, so it starts empty; the previous run's file is kept beside it.
    if os.path.exists(path) and os.path.getsize(path):
        os.replace(path, path.replace(".errors.jsonl", ".errors.prev.jsonl"))
    return ResumableJsonl(path)


def run_ranker(
    instructions: list[Instruction],
    output: str,
    ranker,
    workers: int = 1,
    chunk_size: int = 1,
    price_per_1k: float | None = None,
    completion_price_per_1k: float | None = None,
    progress: bool = True,
    description: str = "ranking",
) -> RunSummary:
    """Rank every instruction not yet in `output` and append its row there, the failures to `errors_path(output)`.

    Args:
        instructions: the rows to rank, with unique ids.
        output: the JSON Lines file; rows already there (by id) are skipped, a torn last line is cut off first.
        ranker: a callable `list[Instruction] -> list[dict | RowFailure]` (`ProbabilisticRanker`,
            `ContextualRanker`, ...).
        workers: chunks ranked at once, in threads (for an API backend: about its `max_concurrency`).
        chunk_size: instructions per ranker call (for a local model: enough to fill its batch).
        price_per_1k, completion_price_per_1k: for the cost estimate in the summary.

    A `BackendConfigError` (bad key, unknown model, no log-probs) stops the run and is raised (the rows written
    so far stay, the rest are done by a rerun); any other exception fails only its chunk's rows.
    """
    from tqdm.auto import tqdm

    started = time.monotonic()
    out = ResumableJsonl(output)
    errors = _start_errors_file(errors_path(output))
    todo = [i for i in instructions if id_key(i.id) not in out.done]
    chunks = [todo[k : k + chunk_size] for k in range(0, len(todo), chunk_size)]
    usage = Usage()
    counts = {"written": 0, "errors": 0}
    bar = tqdm(total=len(todo), desc=description, unit="row", disable=not progress, dynamic_ncols=True)

    def rank_chunk(chunk):
        with track_usage() as chunk_usage:
            try:
                results = ranker(chunk)
            except BackendConfigError:
                raise
            except Exception as err:  # noqa: BLE001 -- the chunk fails, the run goes on
                logger.warning("ranking %d row(s) failed: %s", len(chunk), redact(f"{type(err).__name__}: {err}"))
                results = [RowFailure("generate", f"{type(err).__name__}: {err}")] * len(chunk)
        usage.add(chunk_usage.prompt_tokens, chunk_usage.completion_tokens, chunk_usage.requests)
        return results

    def record(chunk, results):
        for instruction, result in zip(chunk, results):
            if isinstance(result, RowFailure):
                failure = {
                    "id": instruction.id,
                    "line": instruction.line,
                    "stage": result.stage,
                    "reason": redact(result.reason),
                }
                if result.raw is not None:
                    failure["raw"] = redact(result.raw)
                errors.write(failure)
                counts["errors"] += 1
            else:
                out.write(result)
                counts["written"] += 1
        bar.update(len(chunk))
        bar.set_postfix(errors=counts["errors"], refresh=False)

    pending = {}
    next_chunk = 0
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tuna-rank") as pool:
            try:
                while next_chunk < len(chunks) or pending:
                    # keep a bounded number of chunks in flight, so that stopping wastes little work
                    while next_chunk < len(chunks) and len(pending) < 2 * workers:
                        chunk = chunks[next_chunk]
                        pending[pool.submit(rank_chunk, chunk)] = chunk
                        next_chunk += 1
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        record(pending.pop(future), future.result())
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    finally:
        bar.close()
        out.close()
        errors.close()
    return RunSummary(
        total=len(instructions),
        skipped=len(instructions) - len(todo),
        written=counts["written"],
        errors=counts["errors"],
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost=estimate_cost(usage, price_per_1k, completion_price_per_1k),
        seconds=time.monotonic() - started,
        output=output,
        errors_file=errors_path(output),
    )


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON Lines file (for tests and quick looks)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
