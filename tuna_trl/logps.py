"""Model + batch -> the log-probability of every target token, summed per sequence.

`selective_log_softmax` computes log p(target) from logits in chunks of rows, in float32, and its backward
recomputes the softmax per chunk: a (tokens x vocabulary) float32 log-softmax of the whole batch never exists.
"""

from __future__ import annotations

import torch


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, chunk_size):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
        out = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, logits.shape[0], chunk_size):
            chunk = logits[start : start + chunk_size].to(dtype)
            lse[start : start + chunk_size] = chunk.logsumexp(-1)
            out[start : start + chunk_size] = chunk.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1)
        out -= lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            g = grad_out[start:end, None]
            # d log p(y) / d logits = onehot(y) - softmax(logits)
            chunk = (logits[start:end].to(lse.dtype) - lse[start:end, None]).exp_().mul_(-g)
            chunk.scatter_add_(-1, targets[start:end, None], g)
            grad[start:end] = chunk
        return grad, None, None


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits)[m, targets[m]] for each row m.

    Args:
        logits: (M, V) any float dtype.
        targets: (M,) long.
        chunk_size: rows converted to float32 at once (forward and backward).

    Returns:
        (M,) float32 log-probabilities (float64 for float64 logits).
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.promote_types(logits.dtype, torch.float32))
    return _SelectiveLogSoftmax.apply(logits, targets, max(int(chunk_size), 1))


def sequence_logps(model, batch: dict[str, torch.Tensor], chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` on a `RankedCollator` batch and sum the target log-probs of each sequence.

    Returns:
        sums: (S,) float32, sum of log p(token) over each sequence's completion (or reference) tokens, EOS included.
        counts: (S,) long, the number of those tokens.
    """
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    logits = outputs.logits
    selected = logits.flatten(0, 1).index_select(0, batch["target_index"])
    token_logps = selective_log_softmax(selected, batch["target_ids"], chunk_size)
    num_seqs = batch["seq_example"].shape[0]
    sums = token_logps.new_zeros(num_seqs).index_add(0, batch["target_seq"], token_logps)
    counts = torch.bincount(batch["target_seq"], minlength=num_seqs)
    return sums, counts
