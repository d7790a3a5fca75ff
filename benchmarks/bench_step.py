"""One Tuna training step (forward + backward): the paper's padded layout against tuna-trl's default layout.

    python benchmarks/bench_step.py            # prints one JSON line

Model: a random Llama, 4 layers, hidden 256, vocabulary 32000 (the vocabulary sets the log-softmax cost), float32.
Batch: 8 examples x N = 4 completions with Alpaca-like lengths (seeded log-normal; prompt median 60 tokens, at most
256; completion median 120, at most 400; EOS included).

* baseline: the paper's released code (RRHF style): every (prompt, completion) pair is its own row, padded to the
  longest; one forward; a float32 `log_softmax` over the whole (rows x length x vocabulary) logits; `gather`.
* tuna: `TunaRankTrainer`'s default collator and `compute_loss` (prefix-shared packed rows, logits only at the
  target positions, chunked log-softmax).

Both compute the same loss (ranking loss + NLL of the best completion) with the same weights; `loss_abs_diff` shows
it. The baseline is taken at its best: labels are shifted in the collator so `gather` needs no slice (one fewer
full-size gradient), and the released code's `clone()` of the log-probs is left out. Collation is done once, outside
the timed region, as a `DataLoader` worker would (its time is reported apart).

Time: `--reps` repetitions of each variant, interleaved (baseline, tuna, baseline, ...) in this process after a small
warm-up, so that load from other processes hits both alike. `baseline_s` / `tuna_s` are the fastest repetition: on a
shared machine load only ever adds time, so the minimum is the closest to the step's own cost (every repetition is
in `*_runs_s`).

Peak memory: each variant runs again in a fresh subprocess (the two at once: RSS is per process), which builds the
model and the batch, does a small warm-up step (thread pools, kernels, gradient buffers), then resets the kernel's
peak-RSS counter (`/proc/self/clear_refs`) and reports peak RSS minus RSS just before one full step: what the step
adds on top of the weights and gradient buffers, allocator overhead included. A fresh process per variant keeps one
variant's freed-but-cached heap from hiding the other's allocations, and RSS needs no profiler hooks in the step.
Where `clear_refs` is unavailable (not Linux), `ru_maxrss` is used instead, which is still valid because the full
step is the largest allocation of the child's life.

`ideal_speedup` = padded tokens / unique tokens: the speedup of a step whose cost is proportional to the tokens it
computes, if the prompt were computed once and no padding were computed at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


PAD, BOS, EOS = 0, 1, 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--completions", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply every length (smaller: a quick run)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--child", choices=["baseline", "tuna"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _length(rng: random.Random, median: float, sigma: float, low: int, high: int, scale: float) -> int:
    n = round(math.exp(rng.gauss(math.log(median), sigma)))
    return max(1, round(min(max(n, low), high) * scale))


def make_features(args) -> list[dict]:
    """Tokenized rows as `RankedCollator` takes them: random ids, Alpaca-like lengths, completions end with EOS."""
    rng = random.Random(args.seed)

    def ids(n):
        return [rng.randrange(3, args.vocab) for _ in range(n)]

    features = []
    for _ in range(args.examples):
        prompt = [BOS] + ids(_length(rng, 60, 0.7, 8, 256, args.length_scale) - 1)
        completions = [
            ids(_length(rng, 120, 0.7, 4, 400, args.length_scale) - 1) + [EOS] for _ in range(args.completions)
        ]
        features.append({"prompt_ids": prompt, "completion_ids": completions})
    return features


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 16 * 16,  # Llama's ratio
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------------------------------------
# baseline: the released code's layout and log-prob computation
def baseline_batch(features) -> dict[str, torch.Tensor]:
    """Padded (prompt, completion) rows; `labels[r, p]` is the token that position p predicts (-100: none)."""
    rows, labels = [], []
    for f in features:
        for c in f["completion_ids"]:
            rows.append(f["prompt_ids"] + c)
            labels.append([-100] * (len(f["prompt_ids"]) - 1) + c + [-100])
    length = max(map(len, rows))
    input_ids = torch.tensor([r + [PAD] * (length - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels])
    num = len(features[0]["completion_ids"])  # the released code needs the same N for every example
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_completions": num}


def baseline_loss(model, batch, margin=0.1, mle_weight=1.0):
    from tuna_trl import ranking_loss

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits.float(), dim=-1)  # (rows, length, vocab) float32: the cost this project removes
    labels = batch["labels"]
    mask = labels != -100
    # labels are shifted in the collator, so `gather` reads the whole tensor without a slice (one fewer full-size
    # copy in the backward than slicing; the released code also `clone()`s the log-probs first, left out here)
    token_logp = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    sums, counts = token_logp.sum(-1), mask.sum(-1)
    v = (sums / counts).view(-1, batch["num_completions"])
    best = torch.arange(0, sums.shape[0], v.shape[1])  # MLE on the best completion (no reference in this batch)
    nll = -sums[best].sum() / counts[best].sum()
    return ranking_loss(v, margin=margin) + mle_weight * nll


# ------------------------------------------------------------------------------------------------------------------
# tuna: the trainer's default layout and compute_loss
def tuna_trainer(model, workdir):
    from tuna_trl import TunaConfig, TunaRankTrainer
    from tuna_trl.tiny import build_tokenizer

    tokenizer = build_tokenizer()  # only its pad id is used: the features are already tokenized
    tokenizer.pad_token_id = PAD
    args = TunaConfig(output_dir=workdir, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    return TunaRankTrainer(model, args=args, processing_class=tokenizer)


def setup(variant, args, workdir):
    """(model, collate, loss): `collate(features)` -> batch, `loss(batch)` -> the scalar loss of one forward."""
    model = build_model(args)
    model.train()
    if variant == "baseline":
        return model, baseline_batch, lambda batch: baseline_loss(model, batch)
    trainer = tuna_trainer(model, workdir)
    return model, trainer.data_collator, lambda batch: trainer.compute_loss(model, batch)


def step(model, loss, batch) -> tuple[float, float]:
    """(seconds, loss) of one forward + backward; the gradient buffers are kept, as in a training loop."""
    model.zero_grad(set_to_none=False)
    start = time.perf_counter()
    value = loss(batch)
    value.backward()
    return time.perf_counter() - start, value.item()


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _warmup_args(args):
    """A batch small enough to cost nothing, big enough to run every kernel once."""
    return argparse.Namespace(**{**vars(args), "examples": 2, "length_scale": 0.05})


def child(args) -> dict:
    """Peak memory of one full step of `args.child`, in MiB above what the process holds just before it."""
    with tempfile.TemporaryDirectory() as workdir:
        model, collate, loss = setup(args.child, args, workdir)
        step(model, loss, collate(make_features(_warmup_args(args))))  # threads, kernels, gradient buffers
        batch = collate(make_features(args))
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
            reset = True
        except OSError:
            reset = False
        before_kb = _rss_kb("VmRSS")
        step(model, loss, batch)
        if reset and before_kb is not None:
            peak_kb = _rss_kb("VmHWM") - before_kb
        else:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak_kb = (maxrss // 1024 if sys.platform == "darwin" else maxrss) - (before_kb or 0)
    return {"peak_mb": peak_kb / 1024, "method": "VmHWM" if reset else "ru_maxrss"}


def peak_mb(args) -> dict[str, float]:
    """{variant: peak MiB}, each measured by `child` in a fresh process. The two run at once: RSS is per process,
    so they cannot disturb each other's figure, and the wall time halves."""
    cmd = [sys.executable, os.path.abspath(__file__)]
    for key in ("examples", "completions", "layers", "hidden", "vocab", "length_scale", "seed", "threads"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    procs = {
        v: subprocess.Popen(cmd + ["--child", v], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for v in ("baseline", "tuna")
    }
    peaks = {}
    for variant, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"the {variant} memory run failed (exit {proc.returncode}):\n{err[-4000:]}")
        peaks[variant] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
    return peaks


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # stdout carries the one JSON line: library chatter (e.g. DeepSpeed's accelerator notice) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        result = child(args) if args.child else measure(args)
    print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in result.items()}))
    return result


def measure(args) -> dict:

    features = make_features(args)
    with tempfile.TemporaryDirectory() as workdir:
        base_model, base_collate, base_loss = setup("baseline", args, workdir)
        tuna_model, tuna_collate, tuna_loss = setup("tuna", args, workdir)
        start = time.perf_counter()
        base_batch = base_collate(features)
        base_collate_s = time.perf_counter() - start
        start = time.perf_counter()
        tuna_batch = tuna_collate(features)
        tuna_collate_s = time.perf_counter() - start
        warmup = make_features(_warmup_args(args))
        step(base_model, base_loss, base_collate(warmup)), step(tuna_model, tuna_loss, tuna_collate(warmup))
        base, tuna = [], []
        for _ in range(args.reps):  # interleaved, so that load from other processes hits both alike
            base.append(step(base_model, base_loss, base_batch))
            tuna.append(step(tuna_model, tuna_loss, tuna_batch))
        del base_model, base_loss, tuna_model, tuna_loss

    unique = sum(len(f["prompt_ids"]) + sum(map(len, f["completion_ids"])) for f in features)
    padded = base_batch["input_ids"].numel()
    result = {
        "baseline_s": min(t for t, _ in base),
        "tuna_s": min(t for t, _ in tuna),
    }
    result["speedup"] = result["baseline_s"] / result["tuna_s"]
    if not args.no_memory:
        peaks = peak_mb(args)
        result["baseline_peak_mb"], result["tuna_peak_mb"] = peaks["baseline"], peaks["tuna"]
        result["memory_ratio"] = result["tuna_peak_mb"] / result["baseline_peak_mb"]
    result.update(
        ideal_speedup=padded / unique,
        loss_abs_diff=abs(base[-1][1] - tuna[-1][1]),  # both variants compute the same loss
        padded_tokens=padded,
        unique_tokens=unique,
        tuna_tokens=tuna_batch["input_ids"].numel(),
        tuna_layout="prefix-shared" if tuna_batch["attention_mask"].dim() == 4 else "padded",
        baseline_collate_s=base_collate_s,
        tuna_collate_s=tuna_collate_s,
        baseline_runs_s=[round(t, 2) for t, _ in base],
        tuna_runs_s=[round(t, 2) for t, _ in tuna],
        threads=torch.get_num_threads(),
    )
    return result


if __name__ == "__main__":
    main()
