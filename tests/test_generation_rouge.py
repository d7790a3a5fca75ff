"""`rouge_l` / `rouge_l_matrix` against rouge_score itself, on random and real text, with and without stemming."""

import inspect
import random

import pytest
from rouge_score.rouge_scorer import RougeScorer

from tuna_trl.generation import rouge_l, rouge_l_matrix


_VOCAB = (
    "run running runs ran runner fly flies flying happily happy happiness the a an of to and generalization "
    "generalize caresses ponies cats relational conditional 42 3.14 e-mail C++ naïve café ÜBER straße x y z "
    "Tuna tuna TUNA model's models' it's rank-based -- ... !? 2024-01-01 hello, world; (ok) [sic] 日本語 "
).split()


def _random_text(rng: random.Random) -> str:
    if rng.random() < 0.03:
        return rng.choice(["", "   ", "!!! ...", "—"])
    words = [rng.choice(_VOCAB) for _ in range(rng.randint(1, 30))]
    separators = [rng.choice([" ", " ", " ", ", ", "\n", "-", "  "]) for _ in words]
    return "".join(w + s for w, s in zip(words, separators))


def _real_paragraphs() -> list[str]:
    import argparse
    import collections
    import functools
    import json
    import logging
    import subprocess
    import threading
    import unittest

    texts = []
    for module in (argparse, collections, functools, json, logging, subprocess, threading, unittest):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and 20 <= len(doc.split()) <= 120:
                texts.append(doc)
    return sorted(set(texts))


def _perturb(text: str, rng: random.Random) -> str:
    words = text.split()
    words = [w for w in words if rng.random() > 0.15]
    for _ in range(max(1, len(words) // 10)):
        if len(words) > 1:
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    return " ".join(words)


def _pairs(seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = [(_random_text(rng), _random_text(rng)) for _ in range(2000)]
    real = _real_paragraphs()
    assert len(real) > 50
    for _ in range(300):
        a = rng.choice(real)
        pairs.append((a, rng.choice(real) if rng.random() < 0.5 else _perturb(a, rng)))
    return pairs


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_l_equals_rouge_score(use_stemmer):
    scorer = RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    worst = 0.0
    nonzero = 0
    for target, prediction in _pairs(seed=int(use_stemmer)):
        expected = scorer.score(target, prediction)["rougeL"].fmeasure
        worst = max(worst, abs(rouge_l(target, prediction, use_stemmer=use_stemmer) - expected))
        nonzero += expected > 0
    assert worst <= 1e-9
    assert nonzero > 1500  # the pairs really exercise the LCS, not only the empty cases


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_l_matrix_equals_pairwise_rouge_score(use_stemmer):
    scorer = RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    rng = random.Random(7)
    real = _real_paragraphs()
    for _ in range(20):
        texts = [rng.choice(real) for _ in range(rng.randint(2, 6))] + [_random_text(rng) for _ in range(3)] + [""]
        texts.append(_perturb(texts[0], rng))
        matrix = rouge_l_matrix(texts, use_stemmer=use_stemmer)
        for i, target in enumerate(texts):
            for j, prediction in enumerate(texts):
                expected = scorer.score(target, prediction)["rougeL"].fmeasure
                assert abs(matrix[i][j] - expected) <= 1e-9, (i, j)


def test_stemming_changes_the_score():
    assert rouge_l("the cats are running", "the cat runs") < rouge_l("the cats are running", "the cat runs", True)
    assert rouge_l("", "anything") == 0.0 and rouge_l_matrix([]) == []
