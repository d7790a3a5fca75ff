"""`tuna-trl eval rouge|pairwise|length-bias`: measure models the way the paper does. Each command writes
`<name>.json` (everything) and `<name>.md` (tables) to `--output-dir`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..generation.cli import cli_errors  # bad input -> "error: ..." and exit 2; bad key or model -> exit 1
from ..generation.inputs import InputError


logger = logging.getLogger("tuna_trl.evaluation")

EXIT_SOME_FAILED = 3  # finished, but some questions could not be judged: a rerun retries them


def add_parser(subparsers) -> None:
    """Register `eval rouge`, `eval pairwise` and `eval length-bias` on the `tuna-trl` command line."""
    evaluate = subparsers.add_parser("eval", help="Evaluate models: Super NI ROUGE-L, pairwise judging, length bias.")
    commands = evaluate.add_subparsers(dest="eval_command", metavar="EVALUATION", required=True)

    parser = commands.add_parser(
        "rouge",
        help="Super-NaturalInstructions ROUGE-L, 0-shot and 2-shot.",
        description="Greedy-decode Super-NaturalInstructions tasks (definition + k positive examples) and score "
        "ROUGE-L (stemming on, best reference, x100) per task and overall.",
    )
    parser.add_argument("--model", required=True, help="Local model directory or Hub id (transformers causal LM).")
    parser.add_argument(
        "--task-dir",
        default=None,
        help="Directory of official Super NI task JSON files (default: the small shipped set).",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="Task names to keep (file names without .json), or @FILE with one name per line (e.g. test_tasks.txt).",
    )
    parser.add_argument(
        "--shots", type=int, nargs="+", default=[0, 2], help="Numbers of positive examples in the prompt."
    )
    parser.add_argument(
        "--prompt-format",
        choices=["tk", "alpaca"],
        default="tk",
        help="'tk': the official Tk-Instruct encoding; 'alpaca': inside the Alpaca prompt.",
    )
    parser.add_argument("--max-instances", type=int, default=None, help="First K instances per task (official: 100).")
    parser.add_argument(
        "--stop",
        action="append",
        default=None,
        help="Cut predictions at this string (repeatable), e.g. --stop $'\\n\\n' for a base model.",
    )
    _add_generation(parser, max_new_tokens=128)
    _add_output(parser)
    parser.set_defaults(func=cli_errors(run_rouge))

    parser = commands.add_parser(
        "pairwise",
        help="Judge model A against model B with an LLM judge, in both orders.",
        description="An LLM judge compares model A's and model B's answers to each question twice, with the order "
        "swapped; A wins (or loses) only when both orders agree, otherwise it is a tie.",
    )
    parser.add_argument(
        "--questions", required=True, help="Question file, JSONL: question_id, category, turns (e.g. Vicuna QA)."
    )
    for side in ("a", "b"):
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument(
            f"--answers-{side}",
            default=None,
            help=f"Answer file of model {side.upper()}: JSONL with question_id and answer.",
        )
        group.add_argument(
            f"--model-{side}", default=None, help=f"Local model {side.upper()} to generate the answers with (greedy)."
        )
        parser.add_argument(f"--name-{side}", default=None, help=f"Name of model {side.upper()} in the report.")
    parser.add_argument("--judge-model", required=True, help="Judge model name on the endpoint (e.g. gpt-4).")
    parser.add_argument(
        "--judge-base-url", default=None, help="OpenAI-compatible endpoint of the judge (default: OpenAI)."
    )
    parser.add_argument("--judge-api", choices=["chat", "completions"], default="chat", help="Endpoint for the judge.")
    parser.add_argument(
        "--judge-template",
        default=None,
        help="A file replacing the judge prompt; placeholders {question}, {answer_a}, {answer_b}.",
    )
    parser.add_argument("--judge-max-new-tokens", type=int, default=1024, help="Longest judge answer, in tokens.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first K questions.")
    group = parser.add_argument_group("judge requests")
    group.add_argument("--concurrency", type=int, default=8, help="Questions judged at once (two requests each).")
    group.add_argument("--timeout", type=float, default=120.0, help="Seconds per request before it is retried.")
    group.add_argument("--max-retries", type=int, default=8, help="Retries of a failed request.")
    group.add_argument("--backoff-initial", type=float, default=1.0, help="Seconds; first retry's backoff scale.")
    group.add_argument("--backoff-max", type=float, default=60.0, help="Seconds; longest backoff between retries.")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY", help="Environment variable holding the API key.")
    group = _add_generation(parser, max_new_tokens=512)
    group.add_argument(
        "--prompt-template",
        choices=["alpaca", "chat", "none"],
        default="alpaca",
        help="How a question is put to a local model.",
    )
    _add_output(parser)
    parser.set_defaults(func=cli_errors(run_pairwise))

    parser = commands.add_parser(
        "length-bias",
        help="Mean response length by rank position in ranked data, and of models' outputs.",
        description="Mean response length (words, and tokens with --tokenizer) at each rank position of a ranked "
        "data file (rows with 'completions', best first) and of models' answer files, with a PNG plot.",
    )
    parser.add_argument(
        "--ranked", default=None, help="Ranked data file (JSONL rows with prompt and completions, best first)."
    )
    parser.add_argument(
        "--outputs",
        nargs="+",
        default=[],
        metavar="NAME=FILE",
        help="Answer files of models (e.g. answers_*.jsonl written by `eval pairwise`).",
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer directory or Hub id, to also count tokens.")
    parser.add_argument(
        "--unit",
        choices=["words", "tokens"],
        default=None,
        help="Unit of the plot (default: tokens with --tokenizer).",
    )
    _add_output(parser)
    parser.set_defaults(func=cli_errors(run_length_bias))


def _add_generation(parser, max_new_tokens: int):
    group = parser.add_argument_group("local generation")
    group.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call.")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="Longest answer, in tokens.")
    group.add_argument("--device", default=None, help="Where to run local models (default: CUDA when available).")
    return group


def _add_output(parser) -> None:
    parser.add_argument("--output-dir", default="outputs/eval", help="Where the JSON and Markdown results go.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")


def _written(paths) -> None:
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)


def _task_names(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    names = []
    for value in values:
        if value.startswith("@"):
            names += [
                line.strip() for line in Path(value[1:]).read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        else:
            names.append(value)
    return names


def run_rouge(args) -> int:
    from .generate import load_causal_lm
    from .report import write_report
    from .superni import evaluate_superni, superni_markdown

    model, tokenizer = load_causal_lm(args.model, device=args.device)
    result = evaluate_superni(
        model,
        tokenizer,
        task_dir=args.task_dir,
        num_shots=tuple(args.shots),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        prompt_format=args.prompt_format,
        tasks=_task_names(args.tasks),
        max_instances=args.max_instances,
        stop=tuple(args.stop or ()),
        progress=not args.no_progress,
    )
    predictions = result.pop("predictions")
    result["model"] = args.model
    paths = write_report(args.output_dir, "superni", result, f"Model: `{args.model}`\n\n" + superni_markdown(result))
    predictions_path = Path(args.output_dir) / "superni_predictions.jsonl"
    _write_jsonl(predictions_path, predictions)
    print(superni_markdown(result), flush=True)
    _written([*paths, predictions_path])
    return 0


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _model_name(name, answers, model, default) -> str:
    if name:
        return name
    path = answers or model
    return Path(path.rstrip("/")).stem if path else default


def write_model_answers(model_path: str, questions: list[dict], output: str, args) -> None:
    """Generate greedy answers of a local model to the questions missing from `output` (an answer file that a rerun
    resumes)."""
    from ..generation.jsonl import ResumableJsonl, id_key
    from .generate import format_prompt, generate_answers, load_causal_lm

    with ResumableJsonl(output, id_field="question_id") as out:
        todo = [q for q in questions if id_key(q["question_id"]) not in out.done]
        if not todo:
            return
        model, tokenizer = load_causal_lm(model_path, device=args.device)
        prompts = [format_prompt(q["question"], template=args.prompt_template, tokenizer=tokenizer) for q in todo]
        logger.info("generating %d answers with %s", len(todo), model_path)
        # in batches of batches, so that an interrupted run keeps what it has generated
        step = args.batch_size * 8
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            answers = generate_answers(
                model,
                tokenizer,
                prompts[start : start + step],
                args.batch_size,
                args.max_new_tokens,
                progress=not args.no_progress,
            )
            for question, answer in zip(chunk, answers):
                out.write({"question_id": question["question_id"], "model": model_path, "answer": answer})


def run_pairwise(args) -> int:
    from ..generation.openai_backend import OpenAIBackend
    from .inputs import load_answers, load_questions
    from .pairwise import judge_pairwise, pairwise_markdown
    from .report import write_report

    questions = load_questions(args.questions, limit=args.limit)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name_a = _model_name(args.name_a, args.answers_a, args.model_a, "model_a")
    name_b = _model_name(args.name_b, args.answers_b, args.model_b, "model_b")
    if name_a == name_b:
        name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
    answers = {}
    for side in ("a", "b"):
        path = getattr(args, f"answers_{side}")
        if path is None:
            path = str(output_dir / f"answers_{side}.jsonl")
            write_model_answers(getattr(args, f"model_{side}"), questions, path, args)
        answers[side] = load_answers(path)
    template = Path(args.judge_template).read_text(encoding="utf-8") if args.judge_template else None
    backend = OpenAIBackend(
        args.judge_model,
        base_url=args.judge_base_url,
        api=args.judge_api,
        max_concurrency=2 * args.concurrency,
        timeout=args.timeout,
        max_retries=args.max_retries,
        api_key_env=args.api_key_env,
        backoff_initial=args.backoff_initial,
        backoff_max=args.backoff_max,
    )
    try:
        summary = judge_pairwise(
            questions,
            answers["a"],
            answers["b"],
            backend,
            str(output_dir / "pairwise_verdicts.jsonl"),
            names=(name_a, name_b),
            concurrency=args.concurrency,
            template=template,
            max_new_tokens=args.judge_max_new_tokens,
            progress=not args.no_progress,
        )
    finally:
        backend.close()
    markdown = pairwise_markdown(summary)
    paths = write_report(output_dir, "pairwise", summary, markdown)
    print(markdown.split("### By category")[0].rstrip(), flush=True)
    if summary["failed"]:
        print(
            f"{summary['failed']} question(s) not judged: see {summary['errors_file']}; run again to retry them.",
            flush=True,
        )
    _written(paths)
    return EXIT_SOME_FAILED if summary["failed"] else 0


def _named_files(values: list[str]) -> dict[str, str]:
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--outputs takes NAME=FILE, got {value!r}")
        if name in named:
            raise InputError(f"--outputs names {name!r} twice")
        named[name] = path
    return named


def run_length_bias(args) -> int:
    from .lengths import length_bias, length_bias_markdown, plot_length_bias
    from .report import write_report

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.unit == "tokens" and tokenizer is None:
        raise InputError("--unit tokens needs --tokenizer")
    result = length_bias(args.ranked, _named_files(args.outputs), tokenizer)
    result["tokenizer"] = args.tokenizer
    markdown = length_bias_markdown(result)
    paths = write_report(args.output_dir, "length_bias", result, markdown)
    png = plot_length_bias(
        result,
        os.path.join(args.output_dir, "length_bias.png"),
        unit=args.unit or ("tokens" if tokenizer else "words"),
    )
    print(markdown, flush=True)
    _written([*paths, png])
    return 0


def main(argv=None) -> int:
    """`python -m tuna_trl.evaluation.cli rouge|pairwise|length-bias ...`: the same as `tuna-trl eval ...`, without
    loading the other commands."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m tuna_trl.evaluation.cli")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
