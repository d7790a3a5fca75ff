"""Model + batch -> the log-probability of every target token, summed per sequence.

Two things keep this step close to the work the target tokens need:

* the model projects onto the vocabulary only the hidden states that predict a target (`logits_to_keep`, a
  (rows, length) bool mask, when the model takes one), not every prompt and padding position;
* `selective_log_softmax` computes log p(target) from those logits in chunks of rows, in float32, and its backward
  recomputes the softmax per chunk, writing the gradient over the logits: a (tokens x vocabulary) float32
  log-softmax of the whole batch never exists, and the logits' gradient takes no memory of its own.

The model is still called through its top-level `forward`, so DDP, DeepSpeed ZeRO-3 and PEFT hooks run as usual.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
from torch.autograd.function import once_differentiable


class _SelectiveLogSoftmax(torch.autograd.Function):
    # One (chunk_size, V) float32 work buffer is reused for every chunk: on the CPU a fresh allocation per chunk costs
    # page faults that take about as long as the arithmetic.

    @staticmethod
    def forward(ctx, logits, targets, rows, chunk_size, overwrite_logits):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        work = logits.new_empty((min(chunk_size, logits.shape[0]), logits.shape[1]), dtype=dtype)
        for start in range(0, logits.shape[0], chunk_size):
            chunk = logits[start : start + chunk_size]
            peak = chunk.amax(-1, keepdim=True).to(dtype)
            peak = peak.masked_fill_(~torch.isfinite(peak), 0.0)  # rows of -inf give -inf, as torch.logsumexp
            shifted = torch.sub(chunk, peak, out=work[: chunk.shape[0]])
            lse[start : start + chunk_size] = shifted.exp_().sum(-1).log_().add_(peak.squeeze(-1))
        out = logits[rows, targets].to(dtype) - lse[rows]
        ctx.save_for_backward(logits, targets, rows, lse)
        ctx.chunk_size, ctx.overwrite_logits = chunk_size, overwrite_logits
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, targets, rows, lse = ctx.saved_tensors
        # d log p(y_m) / d logits[r] = onehot(y_m) - softmax(logits[r]), summed over the targets m read from row r
        weight = torch.zeros_like(lse).index_add_(0, rows, grad_out.to(lse.dtype))
        grad = logits if ctx.overwrite_logits else torch.empty_like(logits)
        same = logits.dtype == lse.dtype
        if not same:
            work = logits.new_empty((min(ctx.chunk_size, logits.shape[0]), logits.shape[1]), dtype=lse.dtype)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            out = grad[start:end] if same else work[: grad[start:end].shape[0]]
            torch.sub(logits[start:end], lse[start:end, None], out=out).exp_().mul_(-weight[start:end, None])
            if not same:  # low-precision logits: the softmax in float32, rounded once
                grad[start:end] = out
        grad.index_put_((rows, targets), grad_out.to(grad.dtype), accumulate=True)
        return grad, None, None, None, None


def selective_log_softmax(
    logits: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    rows: torch.Tensor | None = None,
    overwrite_logits: bool = False,
) -> torch.Tensor:
    """log softmax(logits[rows[m]])[targets[m]] for each target m.

    Args:
        logits: (U, V) any float dtype.
        targets: (M,) long, token ids.
        chunk_size: logit rows converted to float32 at once (forward and backward).
        rows: (M,) long, the logit row of each target (several targets may share one row); default `arange(M)`.
        overwrite_logits: the backward writes the logits' gradient over `logits` instead of new memory. Only for
            logits that nothing reads after the backward (the output of a forward made for this call): it halves the
            peak memory of this step. Were they saved by another autograd node, that node's backward would raise
            autograd's "modified by an inplace operation" error rather than use wrong values.

    Returns:
        (M,) float32 log-probabilities (float64 for float64 logits).
    """
    if rows is None:
        rows = torch.arange(targets.shape[0], device=targets.device)
    if targets.shape[0] == 0:
        out = logits.new_zeros(0, dtype=torch.promote_types(logits.dtype, torch.float32))
        return out + logits.sum() * 0  # keep the graph connected
    return _SelectiveLogSoftmax.apply(logits, targets, rows, max(int(chunk_size), 1), overwrite_logits)


def _unwrap(model):
    """The `transformers` model under DDP / DeepSpeed / torch.compile / PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed engine
            model = model.module
    return model


def takes_logits_mask(model) -> bool:
    """Whether `model(..., logits_to_keep=<(rows, length) bool mask>)` returns logits for the True positions only.

    True for `transformers` models whose `forward` is defined next to `slice_logits_to_keep`, which flattens a bool
    mask to (num_true, hidden); older or custom models may take `logits_to_keep` with other meanings, so they are not
    given one.
    """
    return _forward_takes_logits_mask(type(_unwrap(model)))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_mask(cls: type) -> bool:
    forward = getattr(cls, "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    module = sys.modules.get(getattr(inspect.unwrap(forward), "__module__", None) or "")
    return "logits_to_keep" in params and getattr(module, "slice_logits_to_keep", None) is not None


def sequence_logps(model, batch: dict[str, torch.Tensor], chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model` on a `RankedCollator` batch and sum the target log-probs of each sequence.

    Returns:
        sums: (S,) float32, sum of log p(token) over each sequence's completion (or reference) tokens, EOS included.
        counts: (S,) long, the number of those tokens.
    """
    input_ids, target_index = batch["input_ids"], batch["target_index"]
    kwargs = {}
    keep = None
    if takes_logits_mask(model):
        keep = torch.zeros(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
        keep[target_index] = True
        kwargs["logits_to_keep"] = keep.view_as(input_ids)
    outputs = model(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        **kwargs,
    )
    logits = outputs.logits
    if keep is not None and logits.dim() == 2:
        # the kept positions come out in flat order: target m reads row (number of kept positions before it)
        rows, expected = (keep.cumsum(0) - 1)[target_index], int(keep.sum())
    else:
        logits, rows, expected = logits.flatten(0, -2), target_index, input_ids.numel()
    if logits.shape[0] != expected:
        raise RuntimeError(
            f"{type(_unwrap(model)).__name__} returned logits of shape {tuple(outputs.logits.shape)} for input_ids of "
            f"shape {tuple(input_ids.shape)}: expected one row of logits per position"
            + (f" kept by `logits_to_keep` ({expected})." if keep is not None else ".")
        )
    # the logits are this call's own: their gradient may take their memory
    token_logps = selective_log_softmax(logits, batch["target_ids"], chunk_size, rows, overwrite_logits=True)
    num_seqs = batch["seq_example"].shape[0]
    sums = token_logps.new_zeros(num_seqs).index_add(0, batch["target_seq"], token_logps)
    counts = torch.bincount(batch["target_seq"], minlength=num_seqs)
    return sums, counts
