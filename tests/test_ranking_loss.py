import pytest
import torch

from tuna_trl import ranking_loss
from tuna_trl.loss import ranking_normalizer


def loop_reference(logps, num_completions, margin, reduction):
    """The loss written as plainly as possible: Python loops over examples and pairs."""
    batch = logps.shape[0]
    if reduction == "sum":
        total = 0.0
        for b in range(batch):
            n = int(num_completions[b])
            for j in range(n):
                for k in range(j + 1, n):
                    total += max(0.0, float(logps[b, k] - logps[b, j]) + margin * (k - j))
        return total / batch
    sums, counts = {}, {}
    for b in range(batch):
        n = int(num_completions[b])
        for j in range(n):
            for k in range(j + 1, n):
                g = k - j
                sums[g] = sums.get(g, 0.0) + max(0.0, float(logps[b, k] - logps[b, j]) + margin * g)
                counts[g] = counts.get(g, 0) + 1
    return sum(sums[g] / counts[g] for g in sums)


@pytest.mark.parametrize("reduction", ["sum", "gap_mean"])
@pytest.mark.parametrize("seed", range(5))
def test_matches_python_loop_with_variable_n(reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, num = 7, 6
    logps = -torch.rand(batch, num, generator=gen, dtype=torch.float64) * 3
    num_completions = torch.randint(1, num + 1, (batch,), generator=gen)
    # garbage in the padded columns must not matter
    pad = torch.arange(num)[None, :] >= num_completions[:, None]
    logps = logps.masked_fill(pad, float("nan"))
    margin = [0.1, 0.0, 0.5, 1.0, 0.05][seed]
    got = ranking_loss(logps, num_completions, margin=margin, reduction=reduction)
    want = loop_reference(logps, num_completions, margin, reduction)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_full_rows_default_and_gradient_is_finite_with_padding():
    logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, float("-inf"), float("nan")]], requires_grad=True)
    loss = ranking_loss(logps, torch.tensor([3, 1]))
    # example 0: pairs (0,1): relu(-0.5+1+0.1)=0.6 (0,2): relu(-2+1+0.2)=0 (1,2): relu(-2+0.5+0.1)=0 -> 0.6; B=2
    assert loss.item() == pytest.approx(0.3)
    loss.backward()
    assert torch.isfinite(logps.grad).all()
    assert logps.grad[0].tolist() == pytest.approx([-0.5, 0.5, 0.0])
    assert ranking_loss(torch.tensor([[-1.0, -2.0, -3.0]]), margin=0.0).item() == 0.0


def test_split_batches_with_global_normalizer_equal_whole_batch():
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(8, 5, generator=gen, dtype=torch.float64)
    n = torch.tensor([5, 2, 3, 1, 4, 5, 2, 3])
    for reduction in ("sum", "gap_mean"):
        whole = ranking_loss(logps, n, reduction=reduction)
        norm = ranking_normalizer(n, reduction, max_gap=4)
        parts = sum(
            ranking_loss(logps[s][:, : int(n[s].max())], n[s], reduction=reduction, normalizer=norm)
            for s in (slice(0, 3), slice(3, 8))
        )
        assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


def test_unknown_reduction():
    with pytest.raises(ValueError, match="gap_mean"):
        ranking_loss(torch.zeros(1, 2), reduction="mean")
