"""`TransformersBackend` on a tiny random Llama: log-probs equal a fresh forward pass, EOS handling, batching."""

import pytest
import torch

from tuna_trl.generation import TransformersBackend, track_usage
from tuna_trl.tiny import build_model, build_tokenizer


PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog and then", "sort 3 1 2"]


@pytest.fixture(scope="module")
def tiny():
    # one thread: a model this small gains nothing from more, and on a busy 2-core machine OpenMP threads waiting
    # for each other make every small matmul ~100x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).eval()
    # make EOS likely, so that some samples stop early and some run to max_new_tokens
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = 4.0
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    yield model, tokenizer
    handle.remove()
    torch.set_num_threads(threads)


def _forward_logprobs(model, tokenizer, prompt, token_ids):
    prompt_ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(prompt_ids) - 1 + t, token].item() for t, token in enumerate(token_ids)]


def test_logprobs_equal_a_fresh_forward_pass(tiny):
    model, tokenizer = tiny
    backend = TransformersBackend(model, tokenizer=tokenizer, batch_size=4)  # 9 sequences: 3 generate calls
    torch.manual_seed(0)
    out = backend.generate(PROMPTS, n=3, temperature=1.3, max_new_tokens=16, logprobs=True)
    assert [len(samples) for samples in out] == [3, 3, 3]
    reasons = set()
    for prompt, samples in zip(PROMPTS, out):
        for sample in samples:
            reasons.add(sample.finish_reason)
            assert len(sample.token_logprobs) == len(sample.token_ids) > 0
            expected = _forward_logprobs(model, tokenizer, prompt, sample.token_ids)
            assert max(abs(a - b) for a, b in zip(sample.token_logprobs, expected)) < 1e-4
            if sample.finish_reason == "stop":  # EOS is the last token, scored, and not in the text
                assert sample.token_ids[-1] == tokenizer.eos_token_id
                assert tokenizer.eos_token_id not in sample.token_ids[:-1]
                assert sample.text == tokenizer.decode(sample.token_ids[:-1], skip_special_tokens=True)
            else:
                assert len(sample.token_ids) == 16 and tokenizer.eos_token_id not in sample.token_ids
    assert reasons == {"stop", "length"}


def test_greedy_batched_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    backend = TransformersBackend(model, tokenizer=tokenizer, batch_size=64)
    batched = backend.generate(PROMPTS, n=2, temperature=0.0, max_new_tokens=12, logprobs=True)
    for prompt, samples in zip(PROMPTS, batched):
        [[alone]] = backend.generate([prompt], n=1, temperature=0.0, max_new_tokens=12, logprobs=True)
        for sample in samples:
            assert sample.token_ids == alone.token_ids and sample.text == alone.text
            assert sample.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)


def test_usage_counts_real_tokens(tiny):
    model, tokenizer = tiny
    backend = TransformersBackend(model, tokenizer=tokenizer)
    with track_usage() as usage:
        out = backend.generate(PROMPTS[:2], n=2, temperature=1.0, max_new_tokens=8, logprobs=False)
    assert out[0][0].token_logprobs is None
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS[:2]) * 2
    assert usage.prompt_tokens == prompt_tokens == backend.usage.prompt_tokens
    assert usage.completion_tokens == sum(len(s.token_ids) for samples in out for s in samples)


def test_loads_a_saved_model_directory(tiny, tmp_path):
    from tuna_trl.tiny import save_tiny

    path = save_tiny(str(tmp_path / "tiny"))
    backend = TransformersBackend(path, device="cpu")
    [[sample]] = backend.generate(["hello"], n=1, max_new_tokens=4, logprobs=True)
    assert backend.name == path and len(sample.token_logprobs) == len(sample.token_ids)
