"""Reading what evaluation compares: question files (Vicuna / MT-bench format), answer files, and ranked data.

Files may be JSON Lines or a JSON array (whatever the extension), read with generation's reader so that every error
names the file and line.
"""

from __future__ import annotations

import logging

from ..generation.inputs import InputError, read_json_records


logger = logging.getLogger(__name__)

ANSWER_FIELDS = ("answer", "output", "text", "completion")


def read_rows(path: str, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """`(line, row)` for each record of `path`, checking that each is an object with the `required` fields.

    Raises:
        InputError (a ValueError): naming the file and line of the first bad record.
    """
    rows = []
    for line, record in read_json_records(str(path)):
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line}: each record must be a JSON object, got {type(record).__name__}")
        missing = [key for key in required if key not in record]
        if missing:
            raise InputError(
                f"{path}:{line}: missing field {missing[0]!r} (found {sorted(record)}); need {list(required)}"
            )
        rows.append((line, record))
    return rows


def load_questions(path: str, limit: int | None = None) -> list[dict]:
    """Questions in the Vicuna/MT-bench format: `{"question_id", "category", "turns": [str, ...]}`, the first
    `limit` only. Each returned dict also gets `line` (for messages) and `question` (the first turn).

    Only the first turn is evaluated: the paper's Vicuna QA questions have one turn each; a question with more
    turns is judged on its first turn (with a warning).
    """
    questions, seen, multi_turn = [], {}, 0
    for line, row in read_rows(path, ("question_id", "turns")):
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise InputError(f"{path}:{line}: 'turns' must be a non-empty list of non-empty strings")
        key = str(row["question_id"])
        if key in seen:
            raise InputError(f"{path}:{line}: question_id {row['question_id']!r} repeats line {seen[key]}")
        seen[key] = line
        multi_turn += len(turns) > 1
        questions.append({**row, "category": row.get("category", ""), "question": turns[0], "line": line})
        if limit is not None and len(questions) >= limit:
            break
    if multi_turn:
        logger.warning("%s: %d question(s) have several turns; only the first turn is evaluated", path, multi_turn)
    return questions


def _answer_text(row: dict) -> str | None:
    for key in ANSWER_FIELDS:
        if isinstance(row.get(key), str):
            return row[key]
    choices = row.get("choices")  # FastChat's answer files: {"choices": [{"index": 0, "turns": [...]}]}
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        turns = choices[0].get("turns")
        if isinstance(turns, list) and turns and isinstance(turns[0], str):
            return turns[0]
    return None


def load_answers(path: str) -> dict[str, str]:
    """`{str(question_id): answer}` from an answer file: rows with `question_id` and one of `answer`, `output`,
    `text`, `completion`, or FastChat's `choices[0].turns[0]`. Ids are compared as strings, so `1` and `"1"` match.
    """
    answers = {}
    for line, row in read_rows(path, ("question_id",)):
        text = _answer_text(row)
        if text is None:
            raise InputError(
                f"{path}:{line}: no answer text; expected one of the fields {list(ANSWER_FIELDS)} (a string) or "
                "FastChat's 'choices': [{'turns': [...]}]"
            )
        answers[str(row["question_id"])] = text
    return answers


def completion_text(value, where: str) -> str:
    """A completion as text: a string, or a conversational completion (a list holding one assistant message)."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], dict)
        and isinstance(value[0].get("content"), str)
    ):
        return value[0]["content"]
    raise InputError(
        f"{where}: expected a string or [{{'role': 'assistant', 'content': ...}}], got {type(value).__name__}"
    )
