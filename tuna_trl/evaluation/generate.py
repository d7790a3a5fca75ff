"""Greedy answers from a local `transformers` model, in left-padded batches, and the prompt templates used to ask.

Evaluation decodes greedily (the paper's setting for Super NI and Vicuna QA), so answers are reproducible.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..generation.inputs import InputError, render_prompt


logger = logging.getLogger(__name__)

PROMPT_TEMPLATES = ("alpaca", "chat", "none")


def format_prompt(
    instruction: str,
    input: str | None = None,
    template: str = "alpaca",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """The text a model is asked with.

    Args:
        template: `"alpaca"` (the Alpaca prompt the paper's models are trained on, with an Input block when `input`
            is given), `"none"` (the instruction, then a blank line and the input when given) — both as in
            `tuna_trl.generation.render_prompt` — or `"chat"` (one user message through
            `tokenizer.apply_chat_template`, with the generation prompt).
    """
    if template == "chat":
        if tokenizer is None or not tokenizer.chat_template:
            raise InputError("template='chat' needs a tokenizer with a chat template; use 'alpaca' or 'none'.")
        content = render_prompt(instruction, input, "none")
        messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template writes BOS itself and the tokenizer adds another when the prompt is encoded: keep one
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [
            tokenizer.bos_token_id
        ]
        return text[len(bos) :] if adds_bos and text.startswith(bos) else text
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"Unknown prompt template {template!r}; choose one of {PROMPT_TEMPLATES}.")
    return render_prompt(instruction, input or None, template)


def load_causal_lm(path: str, device: str | None = None, dtype: str = "auto"):
    """`(model, tokenizer)` from a local directory or Hub id, in eval mode on `device` (default: CUDA when there
    is one, else CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of `prompts`, in prompt order, without the prompt, EOS and special tokens, stripped.

    Runs generation's `TransformersBackend` at temperature 0 (left padding, stop at EOS or after `max_new_tokens`
    tokens) on batches of `batch_size` prompts of similar length, so that little compute goes to padding. The
    tokenizer adds its special tokens (e.g. BOS) to each prompt, as in training. The model's train/eval mode is
    restored afterwards, so this can run in the middle of training.
    """
    from ..generation.transformers_backend import TransformersBackend

    if not prompts:
        return []
    was_training, pad_token = model.training, tokenizer.pad_token
    if pad_token is None:  # batching needs one; EOS is the usual stand-in and is never attended to
        tokenizer.pad_token = tokenizer.eos_token
    try:
        backend = TransformersBackend(model, batch_size=batch_size, device=model.device, tokenizer=tokenizer)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", disable=not progress):
            batch = order[start : start + batch_size]
            samples = backend.generate(
                [prompts[i] for i in batch], n=1, temperature=0.0, max_new_tokens=max_new_tokens
            )
            for i, (sample,) in zip(batch, samples):
                answers[i] = sample.text.strip()
    finally:
        model.train(was_training)
        tokenizer.pad_token = pad_token
    return answers
