"""Dataset rows -> token ids: validation, chat templates, truncation.

Prompt and each completion are tokenized separately and concatenated, so the prompt/completion boundary is exact:
prompt ids (with the tokenizer's special tokens, e.g. BOS) + completion ids (no special tokens) + EOS.
"""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset, IterableDataset


logger = logging.getLogger(__name__)

TOKENIZED_COLUMNS = ["prompt_ids", "completion_ids", "reference_ids"]


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_completion(value: Any, conversational: bool, index: int, field: str) -> None:
    """Raise a ValueError naming the row and field unless `value` is one valid completion."""
    if conversational:
        if not (_is_message_list(value) and len(value) == 1 and value[0]["role"] == "assistant"):
            raise ValueError(
                f"Row {index}, field '{field}': a conversational row needs a list holding one assistant message "
                f"({{'role': 'assistant', 'content': ...}}), got {_describe(value)}."
            )
        value = value[0]["content"]
    if not isinstance(value, str):
        raise ValueError(f"Row {index}, field '{field}': expected a string, got {_describe(value)}.")
    if not value.strip():
        raise ValueError(f"Row {index}, field '{field}': the text is empty.")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def validate_row(row: dict, index: int) -> bool:
    """Check one raw row; return whether it is conversational. Raises ValueError naming the row and field."""
    prompt = row.get("prompt")
    if prompt is None:
        raise ValueError(f"Row {index}, field 'prompt': missing. Each row needs a 'prompt' (a string or messages).")
    conversational = isinstance(prompt, list)
    if conversational and not (_is_message_list(prompt) and prompt):
        raise ValueError(
            f"Row {index}, field 'prompt': expected a string or a non-empty list of {{'role', 'content'}} messages, "
            f"got {_describe(prompt)}."
        )
    if not conversational and not (isinstance(prompt, str) and prompt.strip()):
        raise ValueError(f"Row {index}, field 'prompt': expected a non-empty string, got {_describe(prompt)}.")
    completions = row.get("completions")
    if not isinstance(completions, list) or not completions:
        raise ValueError(
            f"Row {index}, field 'completions': expected a non-empty list of completions ranked best first, "
            f"got {_describe(completions)}."
        )
    for k, completion in enumerate(completions):
        _check_completion(completion, conversational, index, f"completions[{k}]")
    if row.get("reference") is not None:
        _check_completion(row["reference"], conversational, index, "reference")
    return conversational


def _validate_tokenized(row: dict, index: int) -> None:
    def is_ids(x):
        return isinstance(x, list) and all(isinstance(t, int) for t in x)

    if not is_ids(row.get("prompt_ids")) or not row["prompt_ids"]:
        raise ValueError(f"Row {index}, field 'prompt_ids': expected a non-empty list of token ids.")
    completions = row.get("completion_ids")
    if not isinstance(completions, list) or not completions:
        raise ValueError(f"Row {index}, field 'completion_ids': expected a non-empty list of token id lists.")
    for k, ids in enumerate(completions):
        if not is_ids(ids) or not ids:
            raise ValueError(f"Row {index}, field 'completion_ids[{k}]': expected a non-empty list of token ids.")
    if row.get("reference_ids") is not None and not is_ids(row["reference_ids"]):
        raise ValueError(f"Row {index}, field 'reference_ids': expected a list of token ids.")


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def tokenize_row(row: dict, tokenizer, index: int = 0) -> dict:
    """Tokenize one validated raw row into `prompt_ids`, `completion_ids` (best first), `reference_ids` ([] if none).

    String prompts get the tokenizer's special tokens (e.g. BOS); conversational prompts are rendered with the chat
    template and its generation prompt, and a conversational completion is the text the template appends after
    that prompt. Each completion ends with EOS.
    """
    conversational = validate_row(row, index)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos_token_id; Tuna scores completions up to and including EOS.")

    if conversational:
        prompt_text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        prompt_ids = _encode(tokenizer, prompt_text, add_special_tokens=False)

        def completion_text(messages):
            full = tokenizer.apply_chat_template(row["prompt"] + messages, tokenize=False)
            if not full.startswith(prompt_text):
                raise ValueError(
                    f"Row {index}: the chat template does not render the prompt as a prefix of prompt + "
                    "completion, so the completion tokens cannot be separated."
                )
            return full[len(prompt_text) :]
    else:
        prompt_ids = _encode(tokenizer, row["prompt"], add_special_tokens=True)

        def completion_text(text):
            return text

    def encode_completion(value):
        ids = _encode(tokenizer, completion_text(value), add_special_tokens=False)
        return ids if ids and ids[-1] == eos else ids + [eos]

    reference = row.get("reference")
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": [encode_completion(c) for c in row["completions"]],
        "reference_ids": encode_completion(reference) if reference is not None else [],
    }


def truncate_row(
    row: dict, max_length: int | None, max_prompt_length: int | None, max_completions: int | None
) -> dict:
    """Apply the config's limits to a tokenized row; `keep` is False when a completion would have no token left."""
    prompt_ids = row["prompt_ids"]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: the instruction's last words lead to the answer
    completions = row["completion_ids"][:max_completions] if max_completions else row["completion_ids"]
    reference = row.get("reference_ids") or []
    if max_length is not None:
        room = max_length - len(prompt_ids)
        completions = [ids[: max(room, 0)] for ids in completions]
        reference = reference[: max(room, 0)] if reference else []
        keep = room > 0
    else:
        keep = True
    return {"prompt_ids": prompt_ids, "completion_ids": completions, "reference_ids": reference, "keep": keep}


def prepare_dataset(dataset, tokenizer, args, name: str = "train"):
    """Tokenize (unless already tokenized), truncate and filter a dataset for `TunaRankTrainer`.

    Returns a dataset with exactly the columns `prompt_ids`, `completion_ids`, `reference_ids`.
    """
    columns = dataset.column_names or []
    pretokenized = "prompt_ids" in columns

    def process(row, index):
        if pretokenized:
            _validate_tokenized(row, index)
        else:
            row = tokenize_row(row, tokenizer, index)
        return truncate_row(row, args.max_length, args.max_prompt_length, args.max_completions)

    map_kwargs = {"with_indices": True, "remove_columns": [c for c in columns if c not in ("keep",)]}
    if isinstance(dataset, Dataset):
        map_kwargs.update(num_proc=args.dataset_num_proc, desc=f"Tokenizing {name} dataset")
    dataset = dataset.map(process, **map_kwargs)
    if isinstance(dataset, Dataset):
        before = len(dataset)
        dataset = dataset.filter(lambda keep: keep, input_columns="keep", num_proc=args.dataset_num_proc)
        dropped = before - len(dataset)
        if dropped:
            logger.warning(
                "Dropped %d of %d %s rows: max_length=%s leaves no room for a completion after the prompt.",
                dropped, before, name, args.max_length,
            )
        if len(dataset) == 0:
            raise ValueError(f"No {name} rows left after truncation to max_length={args.max_length}.")
    else:
        dataset = dataset.filter(lambda keep: keep, input_columns="keep")
    return dataset.select_columns(TOKENIZED_COLUMNS)
