"""Sampling throughput of `TransformersBackend`: many prompts x n samples per `generate` call vs one prompt (with its
n samples) per call, on a small offline Llama, log-probs included. Prints one JSON line.

    python benchmarks/bench_generate.py [--prompts 32] [--n 4] [--max-new-tokens 32] [--batch-size 128]
"""

import argparse
import json
import random
import time

import torch

from tuna_trl.generation import TransformersBackend
from tuna_trl.tiny import build_model, build_tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per generate call when batched")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="each way is timed this often; the best time counts")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (a model this small gains nothing from more, and on a busy machine "
        "OpenMP threads spin-waiting for each other make every matmul ~100x slower)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=args.hidden_size, num_hidden_layers=args.layers)
    rng = random.Random(0)
    words = "sort reverse count the letters in the word add subtract numbers list answer quick brown fox".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(args.prompts)]
    # every sample runs to max_new_tokens, so that both ways do the same work
    fixed_length = {"min_new_tokens": args.max_new_tokens}
    backend = TransformersBackend(
        model, tokenizer=tokenizer, batch_size=args.batch_size, generation_kwargs=fixed_length
    )
    options = dict(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, logprobs=True)
    backend.generate(prompts[:2], **options)  # warm-up

    def one_prompt_per_call():
        for prompt in prompts:
            backend.generate([prompt], **options)

    def batched():
        backend.generate(prompts, **options)

    torch.manual_seed(0)
    times = {one_prompt_per_call: [], batched: []}
    for _ in range(args.repeats):  # interleaved, so that a burst of load on a shared machine hits both
        for way, spent in times.items():
            started = time.perf_counter()
            way()
            spent.append(time.perf_counter() - started)
    one_at_a_time_s, batched_s = min(times[one_prompt_per_call]), min(times[batched])

    samples = args.prompts * args.n
    print(
        json.dumps(
            {
                "model": f"llama hidden={args.hidden_size} layers={args.layers} vocab={len(tokenizer)}",
                "prompts": args.prompts,
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "torch_threads": torch.get_num_threads(),
                "one_prompt_per_call_s": round(one_at_a_time_s, 3),
                "batched_s": round(batched_s, 3),
                "one_prompt_per_call_samples_per_s": round(samples / one_at_a_time_s, 1),
                "batched_samples_per_s": round(samples / batched_s, 1),
                "ratio": round(one_at_a_time_s / batched_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
