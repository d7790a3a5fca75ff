"""`tuna-trl generate probabilistic|contextual`: rank an instruction file into training rows."""

from __future__ import annotations

import argparse
import logging
import os
import sys


logger = logging.getLogger("tuna_trl.generation")

EXIT_ROWS_FAILED = 3  # finished, but some rows are in the errors file: rerun to retry them


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input and output")
    group.add_argument(
        "--input", required=True, help="Alpaca-style JSON/JSONL (instruction, input, output) or rows with 'prompt'."
    )
    group.add_argument("--output", required=True, help="JSON Lines to append ranked rows to; a rerun resumes it.")
    group.add_argument(
        "--prompt-template",
        choices=["alpaca", "none"],
        default="alpaca",
        help="How Alpaca rows become prompts: the standard Alpaca prompt, or the instruction as is.",
    )
    group.add_argument("--limit", type=int, default=None, help="Only the first K rows of the input.")
    group = parser.add_argument_group("sampling")
    group.add_argument("--n", type=int, default=4, help="Responses sampled per instruction.")
    group.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    group.add_argument("--max-new-tokens", type=int, default=256, help="Longest response, in tokens.")
    group = parser.add_argument_group("serving")
    group.add_argument("--concurrency", type=int, default=16, help="API requests in flight at once.")
    group.add_argument("--batch-size", type=int, default=32, help="Local models: sequences per generate call.")
    group.add_argument("--timeout", type=float, default=120.0, help="Seconds per API request before it is retried.")
    group.add_argument("--max-retries", type=int, default=8, help="Retries of a failed API request.")
    group.add_argument("--backoff-initial", type=float, default=1.0, help="Seconds; first retry's backoff scale.")
    group.add_argument("--backoff-max", type=float, default=60.0, help="Seconds; longest backoff between retries.")
    group.add_argument("--api-key-env", default="OPENAI_API_KEY", help="Environment variable holding the API key.")
    group = parser.add_argument_group("reporting")
    group.add_argument(
        "--price-per-1k-tokens", type=float, default=None, help="Price per 1,000 tokens, for the cost estimate."
    )
    group.add_argument(
        "--completion-price-per-1k-tokens",
        type=float,
        default=None,
        help="Price per 1,000 completion tokens when it differs from --price-per-1k-tokens.",
    )
    group.add_argument("--no-progress", action="store_true", help="No progress bar.")


def add_parser(subparsers) -> None:
    """Register `generate probabilistic` and `generate contextual` on the `tuna-trl` command line."""
    generate = subparsers.add_parser("generate", help="Generate ranked training data (Tuna Sec. 2).")
    methods = generate.add_subparsers(dest="method", metavar="METHOD", required=True)

    parser = methods.add_parser(
        "probabilistic",
        help="Rank a teacher's samples by its own token log-probs.",
        description="Sample --n responses per instruction from a teacher and rank them by the teacher's "
        "length-normalized log-likelihood sum(logp) / len ** beta.",
    )
    _add_common(parser)
    parser.add_argument(
        "--teacher-model",
        required=True,
        help="Model name on the endpoint, or a local model directory (run with transformers).",
    )
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    parser.add_argument(
        "--api",
        choices=["completions", "chat"],
        default="completions",
        help="Which endpoint to sample from; it must return token log-probs.",
    )
    parser.add_argument("--beta", type=float, default=1.3, help="Length-normalization exponent.")
    parser.set_defaults(func=run_probabilistic)

    parser = methods.add_parser(
        "contextual",
        help="Rank a policy's own diverse samples with a judge model.",
        description="Sample --n diverse responses per instruction from the policy and have a judge model rank them.",
    )
    _add_common(parser)
    parser.add_argument(
        "--policy-model",
        required=True,
        help="Local model directory (run with transformers) or http(s) URL of an OpenAI-compatible endpoint.",
    )
    parser.add_argument(
        "--policy-name",
        default=None,
        help="Model name on the --policy-model endpoint (default: the only model it serves).",
    )
    parser.add_argument(
        "--policy-api",
        choices=["completions", "chat"],
        default="completions",
        help="Endpoint for the policy's samples.",
    )
    parser.add_argument(
        "--judge-model", required=True, help="Judge model name on the endpoint, or a local model directory."
    )
    parser.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint of the judge.")
    parser.add_argument("--judge-api", choices=["completions", "chat"], default="chat", help="Endpoint for the judge.")
    parser.add_argument(
        "--judge-template", default=None, help="A file replacing the judge prompt (see docs/generation.md)."
    )
    parser.add_argument("--judge-max-new-tokens", type=int, default=2048, help="Longest judge answer, in tokens.")
    parser.add_argument(
        "--tau", type=float, default=0.8, help="Resample a response whose ROUGE-L with a kept one is >= tau."
    )
    parser.add_argument(
        "--temperature-step", type=float, default=0.1, help="Temperature increase per resampling trial."
    )
    parser.add_argument("--max-trials", type=int, default=3, help="Resampling trials per response.")
    parser.set_defaults(func=run_contextual)


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def _openai_backend(args, model, base_url, api):
    from .openai_backend import OpenAIBackend

    return OpenAIBackend(
        model,
        base_url=base_url,
        api=api,
        max_concurrency=args.concurrency,
        timeout=args.timeout,
        max_retries=args.max_retries,
        api_key_env=args.api_key_env,
        backoff_initial=args.backoff_initial,
        backoff_max=args.backoff_max,
    )


def _local_backend(args, path):
    from .transformers_backend import TransformersBackend

    return TransformersBackend(path, batch_size=args.batch_size)


def _backend(args, model, base_url, api):
    """A local model when `model` is a directory and no endpoint is given, else an OpenAI-compatible endpoint."""
    if base_url is None and os.path.isdir(model):
        return _local_backend(args, model)
    return _openai_backend(args, model, base_url, api)


def _served_model(args) -> str:
    backend = _openai_backend(args, "", args.policy_model, args.policy_api)
    try:
        served = backend.served_models()
    finally:
        backend.close()
    if len(served) != 1:
        raise SystemExit(
            f"error: {args.policy_model} serves {len(served)} models ({', '.join(served) or 'none'}); "
            "choose one with --policy-name"
        )
    return served[0]


def _parallelism(backend, args) -> tuple[int, int]:
    """(workers, chunk_size): many single-instruction API calls at once, or batch-filling chunks for a local model."""
    from .transformers_backend import TransformersBackend

    if isinstance(backend, TransformersBackend):
        return 1, max(1, args.batch_size // args.n)
    return args.concurrency, 1


def _read(args):
    from .inputs import read_instructions

    return read_instructions(args.input, prompt_template=args.prompt_template, limit=args.limit)


def _run(args, instructions, ranker, backend, description, backends) -> int:
    from .runner import run_ranker

    workers, chunk_size = _parallelism(backend, args)
    if description == "contextual" and workers == 1:
        workers = 2  # judge one chunk while the local policy samples the next
    try:
        summary = run_ranker(
            instructions,
            args.output,
            ranker,
            workers=workers,
            chunk_size=chunk_size,
            price_per_1k=args.price_per_1k_tokens,
            completion_price_per_1k=args.completion_price_per_1k_tokens,
            progress=not args.no_progress,
            description=description,
        )
    finally:
        for each in backends:
            if hasattr(each, "close"):
                each.close()
    print(summary.format(), flush=True)
    return EXIT_ROWS_FAILED if summary.errors else 0


def cli_errors(function):
    """Turn the errors a user can fix (bad input, bad key or model) into a one-line message and exit code."""

    def run(args) -> int:
        from .inputs import InputError
        from .sample import BackendConfigError, redact

        try:
            return function(args)
        except (InputError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except BackendConfigError as err:
            print(f"error: {redact(str(err))}", file=sys.stderr)
            return 1

    run.__name__ = function.__name__
    return run


@cli_errors
def run_probabilistic(args) -> int:
    from .rankers import ProbabilisticRanker

    instructions = _read(args)  # bad input fails before a model is loaded
    teacher = _backend(args, args.teacher_model, args.base_url, args.api)
    ranker = ProbabilisticRanker(
        teacher, n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens, beta=args.beta
    )
    return _run(args, instructions, ranker, teacher, "probabilistic", [teacher])


@cli_errors
def run_contextual(args) -> int:
    from .judge import LLMJudge
    from .rankers import ContextualRanker

    instructions = _read(args)
    if _is_url(args.policy_model):
        policy = _openai_backend(args, args.policy_name or _served_model(args), args.policy_model, args.policy_api)
    elif os.path.isdir(args.policy_model):
        policy = _local_backend(args, args.policy_model)
    else:
        print(
            f"error: --policy-model {args.policy_model!r} is neither a local directory nor an http(s) URL",
            file=sys.stderr,
        )
        return 2
    template = None
    if args.judge_template:
        with open(args.judge_template, encoding="utf-8") as f:
            template = f.read()
    judge_backend = _backend(args, args.judge_model, args.judge_base_url, args.judge_api)
    judge = LLMJudge(judge_backend, template=template, max_new_tokens=args.judge_max_new_tokens)
    ranker = ContextualRanker(
        policy,
        judge,
        n=args.n,
        temperature=args.temperature,
        tau=args.tau,
        temperature_step=args.temperature_step,
        max_trials=args.max_trials,
        max_new_tokens=args.max_new_tokens,
        judge_workers=args.concurrency,
    )
    return _run(args, instructions, ranker, policy, "contextual", [policy, judge_backend])


def main(argv=None) -> int:
    """`python -m tuna_trl.generation.cli probabilistic|contextual ...`: the same as `tuna-trl generate ...`,
    without loading the other commands."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m tuna_trl.generation.cli")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
