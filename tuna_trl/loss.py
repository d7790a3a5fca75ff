"""The Tuna ranking loss (paper Eq. 4-6): a margin hinge over every ordered pair of ranked completions.

    L_rank(b) = sum_{j < k < n_b} max(0, v_k - v_j + margin * (k - j))

where v is the (length-normalised) log-probability of completion k of example b and column 0 is the best.
"""

from __future__ import annotations

import torch


REDUCTIONS = ("sum", "gap_mean")


def pairwise_hinge(
    logps: torch.Tensor, num_completions: torch.Tensor | None = None, margin: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge of every pair (j better than k) and the mask of valid pairs.

    Args:
        logps: (B, N) float, the score v of each completion, column 0 = best ranked.
        num_completions: (B,) int, row b is valid in columns 0..n_b-1; `None` means all N are valid.
        margin: the margin per rank step.

    Returns:
        hinge: (B, N, N) with hinge[b, j, k] = relu(v[b, k] - v[b, j] + margin * (k - j)) on valid pairs, 0 elsewhere.
        mask: (B, N, N) bool, True where j < k < n_b.
    """
    batch, num = logps.shape
    rank = torch.arange(num, device=logps.device)
    gap = rank[None, :] - rank[:, None]  # gap[j, k] = k - j
    mask = (gap > 0).expand(batch, num, num)
    if num_completions is not None:
        valid = rank[None, :] < num_completions.to(logps.device)[:, None]  # (B, N)
        mask = mask & valid[:, None, :]  # k < n_b implies j < n_b
    diff = logps[:, None, :] - logps[:, :, None]  # diff[b, j, k] = v_k - v_j
    hinge = torch.relu(diff + margin * gap.to(logps.dtype))
    # `where`, not multiplication: padded columns may hold inf/nan and must not leak into the gradient.
    return torch.where(mask, hinge, torch.zeros_like(hinge)), mask


def ranking_normalizer(
    num_completions: torch.Tensor, reduction: str = "sum", max_gap: int | None = None
) -> torch.Tensor:
    """The denominator(s) `ranking_loss` divides by, so a loss split over micro-batches can be normalised globally.

    Returns a 0-d tensor (the number of examples) for `"sum"`, or a (max_gap,) tensor for `"gap_mean"` whose entry
    g-1 counts the valid pairs (b, j) at gap g, i.e. sum_b max(0, n_b - g). Sum these over micro-batches/processes.
    """
    _check_reduction(reduction)
    if reduction == "sum":
        return torch.tensor(float(num_completions.numel()), device=num_completions.device)
    if max_gap is None:
        max_gap = max(int(num_completions.max()) - 1, 0) if num_completions.numel() else 0
    gaps = torch.arange(1, max_gap + 1, device=num_completions.device)
    return (num_completions[:, None] - gaps[None, :]).clamp(min=0).sum(0).float()


def ranking_loss(
    logps: torch.Tensor,
    num_completions: torch.Tensor | None = None,
    margin: float = 0.1,
    reduction: str = "sum",
    normalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Tuna ranking loss of a batch, a scalar.

    Args:
        logps: (B, N) float, the score v of each completion (mean token log-prob), column 0 = best ranked.
        num_completions: (B,) int, valid completions per row (columns 0..n_b-1); `None`: all N valid.
        margin: margin per rank step (paper: 0.1).
        reduction:
            `"sum"` (paper, default): per example the sum of the hinge over all valid pairs, averaged over the B
            examples (an example with fewer than two completions contributes 0 but still counts in B).
            `"gap_mean"` (the paper's released code): for each gap g = k - j, the mean hinge over all valid (b, j)
            of the batch; the loss is the sum of those means over g.
        normalizer: optional denominators from `ranking_normalizer`, summed over all micro-batches of an
            accumulated (and distributed) batch, so that gradient accumulation is exact. Default: this batch's.
    """
    _check_reduction(reduction)
    if num_completions is None:
        num_completions = torch.full((logps.shape[0],), logps.shape[1], dtype=torch.long, device=logps.device)
    hinge, _ = pairwise_hinge(logps, num_completions, margin)
    if reduction == "sum":
        denominator = ranking_normalizer(num_completions, "sum") if normalizer is None else normalizer
        return hinge.sum() / denominator.clamp(min=1)
    num = logps.shape[1]
    rank = torch.arange(num, device=logps.device)
    gap = (rank[None, :] - rank[:, None]).clamp(min=0)  # (N, N)
    # per_gap[g] = sum of the hinge over pairs at gap g; index 0 collects the (zero) non-pairs
    per_gap = torch.zeros(num, dtype=hinge.dtype, device=hinge.device).index_add(
        0, gap.flatten(), hinge.sum(0).flatten()
    )[1:]
    counts = ranking_normalizer(num_completions, "gap_mean", max_gap=num - 1) if normalizer is None else normalizer
    counts = counts[: num - 1].to(per_gap.dtype)
    return (per_gap / counts.clamp(min=1)).sum()


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown rank loss reduction {reduction!r}; expected one of {REDUCTIONS}.")
