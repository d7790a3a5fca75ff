"""Greedy answers from a local `transformers` model, in left-padded batches, and the prompt templates used to ask.

Evaluation decodes greedily (the paper's setting for Super NI and Vicuna QA), so answers are reproducible.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

# The Stanford Alpaca prompts, which the paper's SFT and Tuna models are trained on.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_TEMPLATES = ("alpaca", "chat", "none")


def format_prompt(
    instruction: str, input: str | None = None, template: str = "alpaca", tokenizer: PreTrainedTokenizerBase | None = None
) -> str:
    """The text a model is asked with.

    Args:
        template: `"alpaca"` (the Alpaca prompt, with an Input block when `input` is given), `"chat"` (one user
            message through `tokenizer.apply_chat_template`, with the generation prompt) or `"none"` (the
            instruction, then a blank line and the input when given).
    """
    if template == "alpaca":
        if input and input.strip():
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
        return ALPACA_PROMPT.format(instruction=instruction.strip())
    content = f"{instruction.strip()}\n\n{input.strip()}" if input and input.strip() else instruction
    if template == "none":
        return content
    if template == "chat":
        if tokenizer is None or not tokenizer.chat_template:
            raise ValueError("template='chat' needs a tokenizer with a chat template; use 'alpaca' or 'none'.")
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"Unknown prompt template {template!r}; choose one of {PROMPT_TEMPLATES}.")


def load_causal_lm(path: str, device: str | None = None, dtype: str = "auto"):
    """`(model, tokenizer)` from a local directory or Hub id, in eval mode on `device` (default: CUDA when there
    is one, else CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    add_special_tokens: bool = True,
    max_prompt_length: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of `prompts`, in prompt order, without the prompt and special tokens, stripped.

    Prompts are sorted by length and batched `batch_size` at a time with left padding, so each batch wastes little
    padding and every completion starts right after its own prompt. Generation stops at EOS or after
    `max_new_tokens` tokens.

    Args:
        add_special_tokens: pass False when the prompts already hold them (e.g. rendered with a chat template).
        max_prompt_length: keep only the last this many prompt tokens (None: no limit).
    """
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first.")
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    if max_prompt_length is not None:
        encoded = [ids[-max_prompt_length:] for ids in encoded]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    answers: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress, unit="batch"):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: the prompt ends where generation starts
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attention_mask[row, width - len(encoded[i]) :] = 1
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                generation_config=config,
            )
            for row, i in enumerate(batch):
                answers[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers
