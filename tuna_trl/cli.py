"""The `tuna-trl` command line. Each sub-command lives in the module that does the work and registers
itself through an `add_parser(subparsers)` function; this file only dispatches."""

import argparse
import importlib
import logging
import sys


# module -> it defines `add_parser(subparsers)`; the parser it adds sets `func=callable(args) -> int | None`
_COMMAND_MODULES = [
    "tuna_trl.generation.cli",  # tuna-trl generate probabilistic|contextual
    "tuna_trl.pipeline",  # tuna-trl pipeline / tuna-trl stage
    "tuna_trl.prm",  # tuna-trl prm train|rerank
    "tuna_trl.evaluation.cli",  # tuna-trl eval rouge|pairwise|length-bias
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuna-trl", description="Tuna: instruction tuning with ranking feedback.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not module_name.startswith(err.name or "?"):  # a missing dependency inside it: surface it
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one line per HTTP request drowns the progress bars; retries and failures are logged by our own code
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
