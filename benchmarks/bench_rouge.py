"""ROUGE-L similarity matrices: tuna-trl's `rouge_l_matrix` vs calling `rouge_score` pairwise.

The workload is what `sample_diverse` and deduplication see: groups of N = 4..16 responses of about 100 words to
the same prompt (real English from the standard library's docstrings, each response a perturbed copy of a shared
answer, so that the LCS is long). Prints one JSON line: times without stemming, and under "stemmed" with it.

    python benchmarks/bench_rouge.py [--matrices 40] [--seed 0]
"""

import argparse
import inspect
import json
import random
import time

from rouge_score.rouge_scorer import RougeScorer

from tuna_trl.generation import rouge_l_matrix


def _corpus_words() -> list[str]:
    import argparse as argparse_module
    import collections
    import email
    import functools
    import json as json_module
    import logging
    import subprocess
    import threading
    import unittest

    words = []
    for module in (
        argparse_module,
        collections,
        email,
        functools,
        json_module,
        logging,
        subprocess,
        threading,
        unittest,
    ):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                words += doc.split()
    return words


def _responses(words, rng, n, length=125):
    start = rng.randrange(len(words) - 2 * length)
    base = words[start : start + length]
    responses = []
    for _ in range(n):
        edited = [w for w in base if rng.random() > 0.2]  # drop a fifth
        for _ in range(length // 10):  # and replace some words
            edited[rng.randrange(len(edited))] = rng.choice(words)
        responses.append(" ".join(edited))
    return responses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    words = _corpus_words()
    rng = random.Random(args.seed)
    groups = [_responses(words, rng, rng.randint(4, 16)) for _ in range(args.matrices)]
    pairs = sum(len(g) * (len(g) - 1) // 2 for g in groups)
    rouge_l_matrix(groups[0], use_stemmer=False)  # warm-up: imports
    results = {}
    for use_stemmer in (False, True):
        scorer = RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        started = time.perf_counter()
        reference = [
            {(i, j): scorer.score(g[i], g[j])["rougeL"].fmeasure for i in range(len(g)) for j in range(i + 1, len(g))}
            for g in groups
        ]
        baseline_s = time.perf_counter() - started
        started = time.perf_counter()
        ours = [rouge_l_matrix(g, use_stemmer=use_stemmer) for g in groups]
        tuna_s = time.perf_counter() - started
        max_abs_diff = max(abs(m[i][j] - value) for m, ref in zip(ours, reference) for (i, j), value in ref.items())
        results[use_stemmer] = {
            "rouge_score_pairwise_s": round(baseline_s, 4),
            "tuna_s": round(tuna_s, 4),
            "speedup": round(baseline_s / tuna_s, 1),
            "max_abs_diff": max_abs_diff,
        }
    print(
        json.dumps(
            {
                "matrices": len(groups),
                "texts_per_matrix": "4-16",
                "pairs": pairs,
                "mean_words": round(sum(len(t.split()) for g in groups for t in g) / sum(map(len, groups)), 1),
                **results[False],
                "stemmed": results[True],
            }
        )
    )


if __name__ == "__main__":
    main()
