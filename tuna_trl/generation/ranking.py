"""Ranking without a judge (probabilistic ranking, Tuna Sec. 2.1) and diverse self-sampling for contextual ranking
(Sec. 2.2)."""

from __future__ import annotations

from .rouge import rouge_l
from .sample import Backend, Sample


def probabilistic_score(token_logprobs: list[float] | None, beta: float = 1.3) -> float:
    """Length-normalized log-likelihood `sum(token_logprobs) / len(token_logprobs) ** beta` (Tuna Eq. 1).

    beta > 1 favours longer responses a little more than the plain mean log-prob (beta = 1) would.
    """
    if not token_logprobs:
        raise ValueError(
            "probabilistic ranking needs the token log-probs of every sample; got "
            f"{'none' if token_logprobs is None else 'an empty list'}"
        )
    if any(lp is None for lp in token_logprobs):
        raise ValueError("probabilistic ranking needs the log-prob of every token; some are missing (None)")
    return sum(token_logprobs) / len(token_logprobs) ** beta


def probabilistic_rank(samples: list[Sample], beta: float = 1.3) -> list[Sample]:
    """`samples` sorted best first by `probabilistic_score`; equal scores keep their sampling order.

    Raises ValueError when any sample lacks log-probs: ranking on missing data would be silently wrong.
    """
    scores = [probabilistic_score(sample.token_logprobs, beta) for sample in samples]
    order = sorted(range(len(samples)), key=lambda i: (-scores[i], i))
    return [samples[i] for i in order]


def _max_similarity(text: str, kept: list[Sample]) -> float:
    return max((rouge_l(other.text, text) for other in kept), default=0.0)


def sample_diverse_many(
    backend: Backend,
    prompts: list[str],
    n: int = 4,
    temperature: float = 1.0,
    tau: float = 0.8,
    temperature_step: float = 0.1,
    max_trials: int = 3,
    max_new_tokens: int = 256,
) -> list[tuple[list[Sample], dict]]:
    """`sample_diverse` for many prompts at once, batching every backend call across the prompts.

    Returns, per prompt, the `n` kept samples and `{"trials": resamples made, "temperatures": [temperature each
    kept sample was drawn at]}`.
    """
    first = backend.generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens)
    kept: list[list[Sample]] = [[] for _ in prompts]
    info = [{"trials": 0, "temperatures": []} for _ in prompts]
    for slot in range(n):
        # per prompt: the candidates tried for this slot as (similarity to the kept ones, temperature, sample)
        tried = {
            p: [(_max_similarity(first[p][slot].text, kept[p]), temperature, first[p][slot])]
            for p in range(len(prompts))
        }
        pending = [p for p in tried if tried[p][0][0] >= tau]
        for trial in range(1, max_trials + 1):
            if not pending:
                break
            trial_temperature = temperature + trial * temperature_step
            again = backend.generate(
                [prompts[p] for p in pending], n=1, temperature=trial_temperature, max_new_tokens=max_new_tokens
            )
            still_pending = []
            for p, (sample,) in zip(pending, again):
                info[p]["trials"] += 1
                similarity = _max_similarity(sample.text, kept[p])
                tried[p].append((similarity, trial_temperature, sample))
                if similarity >= tau:
                    still_pending.append(p)
            pending = still_pending
        for p, candidates in tried.items():
            # the last candidate when it passed, else the least similar one (the earliest among equals)
            passed = candidates[-1][0] < tau
            _, used_temperature, sample = candidates[-1] if passed else min(candidates, key=lambda c: c[0])
            kept[p].append(sample)
            info[p]["temperatures"].append(round(used_temperature, 6))
    return list(zip(kept, info))


def sample_diverse(
    backend: Backend,
    prompt: str,
    n: int = 4,
    temperature: float = 1.0,
    tau: float = 0.8,
    temperature_step: float = 0.1,
    max_trials: int = 3,
    max_new_tokens: int = 256,
) -> list[Sample]:
    """`n` samples of `prompt` that are not near-copies of each other (Tuna Sec. 2.2).

    The n samples are drawn at `temperature` in one call; then, in order, a sample whose ROUGE-L F-measure with a
    sample already kept is >= `tau` is redrawn at a temperature raised by `temperature_step` per trial (each slot
    starts again from `temperature`), at most `max_trials` times; when no trial passes, the least similar of the
    tried samples (the first one included) is kept.
    """
    return sample_diverse_many(backend, [prompt], n, temperature, tau, temperature_step, max_trials, max_new_tokens)[
        0
    ][0]
