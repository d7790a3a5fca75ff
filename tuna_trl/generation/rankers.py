"""The two ways to turn instructions into ranked rows (Tuna Sec. 2): each is a callable taking a chunk of
`Instruction`s and returning, per instruction, a finished row (a dict) or a `RowFailure`."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .inputs import Instruction
from .judge import Judge, JudgeParseError
from .ranking import probabilistic_rank, probabilistic_score, sample_diverse_many
from .sample import Backend, BackendConfigError, Sample, track_usage


@dataclass
class RowFailure:
    """Why one instruction produced no row. `stage` is "generate" or "judge"; `raw` is the judge's answer."""

    stage: str
    reason: str
    raw: str | None = None


def _row(instruction: Instruction, completions: list[str], scores: list, meta: dict) -> dict:
    return {
        "id": instruction.id,
        "prompt": instruction.prompt,
        "completions": completions,
        "reference": instruction.reference,
        "scores": scores,
        "meta": meta,
    }


def _non_empty(samples: list[Sample]) -> list[Sample]:
    # an empty completion cannot be trained on (the trainer rejects it) and says nothing about the ranking
    return [sample for sample in samples if sample.text.strip()]


class ProbabilisticRanker:
    """Sample `n` responses from a teacher and rank them by the teacher's own length-normalized log-likelihood
    (`probabilistic_rank`); `scores` holds each completion's score."""

    def __init__(
        self, teacher: Backend, n: int = 4, temperature: float = 1.0, max_new_tokens: int = 256, beta: float = 1.3
    ):
        self.teacher = teacher
        self.n = n
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.beta = beta

    def __call__(self, instructions: list[Instruction]) -> list[dict | RowFailure]:
        with track_usage() as usage:
            per_prompt = self.teacher.generate(
                [i.prompt for i in instructions], self.n, self.temperature, self.max_new_tokens, logprobs=True
            )
        results = []
        for instruction, samples in zip(instructions, per_prompt):
            kept = _non_empty(samples)
            if not kept:
                results.append(RowFailure("generate", f"all {len(samples)} samples were empty"))
                continue
            ranked = probabilistic_rank(kept, self.beta)
            meta = {
                "method": "probabilistic",
                "teacher": self.teacher.name,
                "n": self.n,
                "temperature": self.temperature,
                "beta": self.beta,
                "empty_samples_dropped": len(samples) - len(kept),
                "finish_reasons": [s.finish_reason for s in ranked],
                "usage": usage.as_dict(),
                "usage_shared_by": len(instructions),
            }
            scores = [probabilistic_score(s.token_logprobs, self.beta) for s in ranked]
            results.append(_row(instruction, [s.text for s in ranked], scores, meta))
        return results


class ContextualRanker:
    """Sample `n` diverse responses from the policy (`sample_diverse`) and have `judge` rank them; `scores` holds
    the judge's score of each completion (None where it gave none). Responses the judge leaves out (duplicates)
    are left out of the row. `judge_workers` rows of one chunk are judged at once."""

    def __init__(
        self,
        policy: Backend,
        judge: Judge,
        n: int = 4,
        temperature: float = 1.0,
        tau: float = 0.8,
        temperature_step: float = 0.1,
        max_trials: int = 3,
        max_new_tokens: int = 256,
        judge_workers: int = 1,
    ):
        self.policy = policy
        self.judge = judge
        self.n = n
        self.temperature = temperature
        self.tau = tau
        self.temperature_step = temperature_step
        self.max_trials = max_trials
        self.max_new_tokens = max_new_tokens
        self.judge_workers = judge_workers

    def __call__(self, instructions: list[Instruction]) -> list[dict | RowFailure]:
        with track_usage() as policy_usage:
            diverse = sample_diverse_many(
                self.policy,
                [i.prompt for i in instructions],
                n=self.n,
                temperature=self.temperature,
                tau=self.tau,
                temperature_step=self.temperature_step,
                max_trials=self.max_trials,
                max_new_tokens=self.max_new_tokens,
            )

        def judge(args):
            instruction, (samples, info) = args
            return self._judge(instruction, samples, info, policy_usage, len(instructions))

        if self.judge_workers > 1 and len(instructions) > 1:
            # a chunk from a local policy holds many rows: judge them concurrently over the API, each in a copy of
            # this thread's context so that the caller's `track_usage` scopes still see the judge's tokens
            contexts = [contextvars.copy_context() for _ in instructions]
            with ThreadPoolExecutor(min(self.judge_workers, len(instructions))) as pool:
                return list(pool.map(lambda ctx, args: ctx.run(judge, args), contexts, zip(instructions, diverse)))
        return [judge(args) for args in zip(instructions, diverse)]

    def _judge(self, instruction, samples, info, policy_usage, shared_by) -> dict | RowFailure:
        kept = [k for k, sample in enumerate(samples) if sample.text.strip()]
        if not kept:
            return RowFailure("generate", f"all {len(samples)} samples were empty")
        responses = [samples[k].text for k in kept]
        with track_usage() as judge_usage:
            try:
                verdict = self.judge(
                    instruction.instruction, responses, input=instruction.input, reference=instruction.reference
                )
            except JudgeParseError as err:
                return RowFailure("judge", err.reason, raw=err.raw)
            except BackendConfigError:
                raise
            except Exception as err:  # noqa: BLE001 -- one row's judge failure must not stop the run
                return RowFailure("judge", f"{type(err).__name__}: {err}")
        order = verdict.model_ranking()
        invalid = [i for i in order if not (isinstance(i, int) and 0 <= i < len(responses))] or (
            ["a repeated index"] if len(set(order)) != len(order) else []
        )
        if invalid:
            return RowFailure(
                "judge", f"the judge's ranking {order} has {invalid[0]!r}, not a response index", raw=verdict.raw
            )
        if not order:
            return RowFailure("judge", "the judge ranked none of the policy's responses", raw=verdict.raw)
        meta = {
            "method": "contextual",
            "policy": self.policy.name,
            "judge": getattr(self.judge, "name", type(self.judge).__name__),
            "n": self.n,
            "tau": self.tau,
            "temperatures": [info["temperatures"][kept[i]] for i in order],
            "trials": info["trials"],
            "judge_ranking": list(verdict.ranking),
            "dropped": len(samples) - len(order),
            "usage": {"policy": policy_usage.as_dict(), "judge": judge_usage.as_dict()},
            "usage_shared_by": shared_by,
        }
        scores = [verdict.scores.get(i) for i in order]
        return _row(instruction, [responses[i] for i in order], scores, meta)
