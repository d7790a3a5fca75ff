import os

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tokenizer():
    from tuna_trl.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    """A fresh tiny random Llama (float32) for each call: `make_model(seed=0, attn_implementation="sdpa")`."""
    from tuna_trl.tiny import build_model

    def make(**kwargs):
        return build_model(tokenizer, **kwargs)

    return make


@pytest.fixture
def ranked_rows():
    """Raw rows with variable N, variable lengths, with and without a reference."""
    return [
        {"prompt": "sort the words: pear apple fig", "completions": ["apple fig pear", "fig apple pear", "pear"],
         "reference": "apple fig pear"},
        {"prompt": "add 2 and 3", "completions": ["5", "the answer is 6", "7", "no idea at all, sorry"],
         "reference": "2 + 3 = 5"},
        {"prompt": "reverse: a b c d e f", "completions": ["f e d c b a", "a b c"], "reference": None},
        {"prompt": "count the letters in banana", "completions": ["6"], "reference": "banana has 6 letters"},
        {"prompt": "say yes", "completions": ["yes", "yes yes", "no"], "reference": None},
    ]  # fmt: skip
