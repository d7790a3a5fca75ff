"""Reading instruction data to rank: Alpaca-style JSON/JSONL (`instruction`, `input`, `output`) or rows that already
have a `prompt`. Every error names the file and the line."""

from __future__ import annotations

import json
from dataclasses import dataclass


# The standard Alpaca prompts (Taori et al., 2023), as the Tuna paper's models were trained with.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_TEMPLATES = ("alpaca", "none")


@dataclass
class Instruction:
    """One row to rank.

    Attributes:
        id: the row's `id` field, else its 0-based position in the file.
        prompt: the text the policy/teacher model continues.
        instruction, input: what the judge is shown (for `prompt` rows: the prompt, and no input).
        reference: the row's original answer (`output`, or `reference`), if any.
        line: the row's line in the file, for error messages.
    """

    id: object
    prompt: str
    instruction: str
    input: str | None
    reference: str | None
    line: int


class InputError(ValueError):
    pass


def render_prompt(instruction: str, input: str | None, template: str = "alpaca") -> str:
    """The prompt for an Alpaca row: the standard Alpaca prompt, or (`"none"`) the instruction, then the input after
    a blank line when there is one."""
    if template == "alpaca":
        if input:
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT.format(instruction=instruction)
    if template == "none":
        return f"{instruction}\n\n{input}" if input else instruction
    raise ValueError(f"prompt template must be one of {PROMPT_TEMPLATES}, got {template!r}")


def read_json_records(path: str) -> list[tuple[int, object]]:
    """(line number, parsed value) of each record: the elements of a top-level JSON array, or each non-blank line
    of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if not stripped.startswith("["):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno})") from None
        return records
    # a JSON array, decoded element by element to know each element's line
    decoder = json.JSONDecoder()
    records, pos = [], len(text) - len(stripped) + 1

    def skip_space(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i, what):
        line = text.count("\n", 0, i) + 1
        raise InputError(f"{path}:{line}: {what}")

    pos = skip_space(pos)
    if pos < len(text) and text[pos] == "]":
        return []
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
        records.append((text.count("\n", 0, pos) + 1, value))
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            if text[pos + 1 :].strip():
                fail(pos + 1, "unexpected text after the closing ']' of the JSON array")
            return records
        else:
            fail(pos, "expected ',' or ']' between the elements of the JSON array")


def _optional_str(path, line, record, key):
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise InputError(f"{path}:{line}: field '{key}' must be a string, got {type(value).__name__}")
    return value or None


def read_instructions(path: str, prompt_template: str = "alpaca", limit: int | None = None) -> list[Instruction]:
    """Read `path` (a JSON array or JSON Lines, whatever the extension) into `Instruction`s, the first `limit` only.

    A record either has `prompt` (used as is; `reference` or `output` as the reference) or `instruction` with
    optional `input` and `output` (the prompt is rendered with `prompt_template`, "alpaca" or "none").

    Raises:
        InputError: naming the file and line, for invalid JSON, a record that is not an object, a missing or
            non-string field, or a repeated `id`.
    """
    if prompt_template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template must be one of {PROMPT_TEMPLATES}, got {prompt_template!r}")
    rows, seen = [], {}
    for index, (line, record) in enumerate(read_json_records(path)):
        if limit is not None and index >= limit:
            break
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line}: each record must be a JSON object, got {type(record).__name__}")
        row_id = record.get("id", index)
        if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
            raise InputError(f"{path}:{line}: field 'id' must be a string or an integer")
        key = json.dumps(row_id)
        if key in seen:
            raise InputError(f"{path}:{line}: id {row_id!r} repeats the id of line {seen[key]}; ids must be unique")
        seen[key] = line
        if "prompt" in record:
            prompt = _optional_str(path, line, record, "prompt")
            if not prompt:
                raise InputError(f"{path}:{line}: field 'prompt' is empty")
            reference = _optional_str(path, line, record, "reference") or _optional_str(path, line, record, "output")
            rows.append(Instruction(row_id, prompt, prompt, None, reference, line))
        elif "instruction" in record:
            instruction = _optional_str(path, line, record, "instruction")
            if not instruction:
                raise InputError(f"{path}:{line}: field 'instruction' is empty")
            input = _optional_str(path, line, record, "input")
            reference = _optional_str(path, line, record, "output")
            prompt = render_prompt(instruction, input, prompt_template)
            rows.append(Instruction(row_id, prompt, instruction, input, reference, line))
        else:
            raise InputError(
                f"{path}:{line}: a record needs either 'prompt' or 'instruction' (Alpaca format); "
                f"found fields {sorted(record)}"
            )
    return rows
