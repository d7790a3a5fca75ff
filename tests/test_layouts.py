"""The prefix-shared packed layout against the padded one (same v, loss and gradients in float32, to 1e-4), and the
chunked log-probs against a plain float64 log-softmax."""

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch

from tuna_trl import RankedCollator, TunaConfig, TunaRankTrainer
from tuna_trl import logps as logps_module
from tuna_trl.logps import selective_log_softmax, sequence_logps, takes_logits_mask


TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tok():
    from tuna_trl.tiny import build_tokenizer

    return build_tokenizer()


def tiny_model(tok, attn="sdpa", seed=3):
    from tuna_trl.tiny import build_model

    return build_model(tok, seed=seed, attn_implementation=attn)


def random_features(vocab, seed, sizes=(3, 1, 4, 2, 4)):
    """Variable N and lengths; references: none, equal to the best completion, or a sequence of their own."""
    rng = random.Random(seed)

    def ids(low, high):
        return [rng.randrange(4, vocab) for _ in range(rng.randint(low, high))]

    features = []
    for b, n in enumerate(sizes):
        completions = [ids(1, 9) for _ in range(n)]
        reference = [None, completions[0], ids(2, 7)][b % 3]
        features.append({"prompt_ids": ids(1, 12), "completion_ids": completions, "reference_ids": reference})
    return features


def loss_v_grads(trainer, model, batch):
    model.zero_grad(set_to_none=True)
    loss, out = trainer.compute_loss(model, batch, return_outputs=True)
    loss.backward()
    return loss.detach(), out["logps"], {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded(tmp_path, tok, attn):
    model = tiny_model(tok, attn)
    args = TunaConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], margin=0.05)
    trainer = TunaRankTrainer(model, args=args, processing_class=tok)
    default = trainer.data_collator
    assert default.padding_free, f"{attn} attention should default to the prefix-shared layout"
    assert default.mask_dtype == (torch.float32 if attn == "eager" else torch.bool)
    features = random_features(len(tok), seed=len(attn))

    for mle_target in ("reference", "all"):
        padded = dataclasses.replace(default, padding_free=False, mle_target=mle_target)
        want_loss, want_v, want_grads = loss_v_grads(trainer, model, padded(features))
        assert want_v.shape == (5, 4)
        for side in ("right", "left"):
            collator = dataclasses.replace(default, mle_target=mle_target, padding_side=side, pad_to_multiple_of=8)
            batch = collator(features)
            assert batch["attention_mask"].shape[:2] == (len(features), 1)  # one row per example
            loss, v, grads = loss_v_grads(trainer, model, batch)
            torch.testing.assert_close(v, want_v, **TOL)
            torch.testing.assert_close(loss, want_loss, **TOL)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, want_grads[name], **TOL, msg=lambda m: f"{name} {side}: {m}")


def test_logits_only_at_targets_match_full_logits(tok, monkeypatch):
    """The `logits_to_keep` path and the full-logits fallback give the same sums and gradients, also under PEFT."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    assert takes_logits_mask(model)
    batch = RankedCollator(tok.pad_token_id, padding_free=True)(random_features(len(tok), seed=7))
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        sums, counts = sequence_logps(model, batch, chunk_size=7)
        grads = torch.autograd.grad((sums * torch.linspace(-1, 1, sums.shape[0])).sum(), params)
        return sums.detach(), counts, grads

    sums, counts, grads = run()
    monkeypatch.setattr(logps_module, "takes_logits_mask", lambda model: False)
    full_sums, full_counts, full_grads = run()
    torch.testing.assert_close(sums, full_sums, **TOL)
    assert torch.equal(counts, full_counts)
    for grad, full in zip(grads, full_grads):
        torch.testing.assert_close(grad, full, **TOL)


def test_logits_of_the_wrong_shape_are_an_error():
    class Odd(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], 2, 10))

    batch = RankedCollator(0)([{"prompt_ids": [1, 5], "completion_ids": [[7, 2]]}])
    message = r"Odd returned logits of shape \(1, 2, 10\) for input_ids of shape \(1, 4\)"
    with pytest.raises(RuntimeError, match=message):
        sequence_logps(Odd(), batch)


def test_models_without_a_logits_mask_are_not_given_one():
    class Custom(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
            raise AssertionError("not called")

    assert not takes_logits_mask(Custom())  # takes `logits_to_keep`, but not from a `slice_logits_to_keep` module
    assert not takes_logits_mask(torch.nn.Linear(2, 2))


def test_wrapped_models_are_given_a_logits_mask(tok):
    class Wrapper(torch.nn.Module):  # as DDP and DeepSpeed's engine hold the model
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert takes_logits_mask(Wrapper(tiny_model(tok)))


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_selective_log_softmax_with_shared_rows(dtype, chunk_size, overwrite):
    torch.manual_seed(0)
    leaf = (torch.randn(6, 11) * 3).to(dtype).requires_grad_()
    logits = leaf * 1  # a non-leaf, as a model's output is
    rows = torch.tensor([0, 0, 0, 2, 3, 3, 5, 1])  # several targets may read one row; row 4 is read by none
    targets = torch.randint(0, 11, (8,))
    weight = torch.randn(8)

    exact = leaf.detach().double().requires_grad_()
    want = torch.log_softmax(exact, -1)[rows, targets]
    (want_grad,) = torch.autograd.grad((want * weight.double()).sum(), exact)

    got = selective_log_softmax(logits, targets, chunk_size, rows, overwrite_logits=overwrite)
    (grad,) = torch.autograd.grad((got * weight).sum(), leaf)
    assert got.dtype == torch.float32 and grad.dtype == dtype
    tol = TOL if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(grad.double(), want_grad, **tol)
    assert torch.all(grad[4] == 0)
    assert torch.equal(logits, leaf * 1) != overwrite  # left alone unless asked to overwrite


def test_overwritten_logits_needed_elsewhere_raise_instead_of_corrupting():
    logits = torch.randn(3, 5, requires_grad=True) * 1
    other = (logits**2).sum()  # PowBackward saves `logits`
    got = selective_log_softmax(logits, torch.tensor([0, 1, 2]), overwrite_logits=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (got.sum() + other).backward()


def test_selective_log_softmax_with_masked_vocabulary():
    logits = torch.randn(4, 9)
    logits[:, 5:] = float("-inf")  # e.g. padded vocabulary entries a model masks out
    targets = torch.tensor([0, 4, 2, 1])
    got = selective_log_softmax(logits, targets, chunk_size=3)
    torch.testing.assert_close(got, torch.log_softmax(logits, -1)[torch.arange(4), targets])


def test_selective_log_softmax_gradcheck():
    torch.manual_seed(1)
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    rows, targets = torch.tensor([0, 1, 1, 4]), torch.tensor([3, 0, 6, 2])
    assert torch.autograd.gradcheck(lambda x: selective_log_softmax(x, targets, 2, rows), (logits,))


def test_block_mask_is_prompt_plus_own_completion():
    collator = RankedCollator(pad_token_id=0, padding_free=True, padding_side="left")
    batch = collator(
        [{"prompt_ids": [1, 5], "completion_ids": [[7, 2], [8, 2]]}, {"prompt_ids": [1], "completion_ids": [[9]]}]
    )
    # row 1 is left-padded by 4: [pad pad pad pad | 1 | 9]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3], [0, 0, 0, 0, 0, 1]]
    mask = batch["attention_mask"][:, 0].int().tolist()
    assert mask[0] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ]
    assert [r[4:] for r in mask[1][4:]] == [[1, 0], [1, 1]]
    assert all(any(r) for r in mask[1])  # padding rows attend to something: no NaN
    assert not any(mask[1][q][k] for q in (4, 5) for k in range(4))  # real tokens never see padding
    # targets: token 7 is predicted by the prompt's last token, 8 too (completion 1 does not follow the prompt)
    assert batch["target_ids"].tolist() == [7, 2, 8, 2, 9]
    assert batch["target_index"].tolist() == [1, 2, 1, 4, 6 + 4]


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="Feature 1 has empty `prompt_ids`"):
        RankedCollator(0)([{"prompt_ids": [1], "completion_ids": [[2]]}, {"prompt_ids": [], "completion_ids": [[2]]}])


def _distributed_worker(rank, mode, port, features, out):
    """One of 2 CPU processes: the rank's batch through DDP or a DeepSpeed ZeRO-3 engine; rank 0 saves the grads."""
    import os

    import torch.distributed as dist

    from tuna_trl.tiny import build_model, build_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    batch = RankedCollator(tok.pad_token_id, padding_free=True)(features[rank])
    if mode == "ddp":
        dist.init_process_group("gloo", rank=rank, world_size=2)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3},
            "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
            "zero_allow_untested_optimizer": True,
        }
        wrapped, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    assert takes_logits_mask(wrapped)
    sums, counts = sequence_logps(wrapped, batch, chunk_size=5)
    loss = (sums / counts).sum()
    if mode == "ddp":
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
    else:
        from deepspeed.utils import safe_get_full_grad

        wrapped.backward(loss)
        grads = {n: safe_get_full_grad(p) for n, p in wrapped.module.named_parameters()}
    if rank == 0:
        torch.save({n: g.clone() for n, g in grads.items()}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_logits_mask_under_ddp_and_zero3(tmp_path, tok, mode):
    """The `logits_to_keep` call and the overwritten logits give the single-process gradients through DDP and
    ZeRO-3 (whose hooks gather parameters around each module's forward and backward): 2 CPU processes, gloo."""
    import socket

    import torch.multiprocessing as mp

    from tuna_trl.tiny import build_model

    if mode == "zero3":
        pytest.importorskip("deepspeed")
    features = [random_features(len(tok), seed=s, sizes=(2, 3)) for s in (11, 12)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "grads.pt"
    mp.spawn(_distributed_worker, args=(mode, port, features, str(out)), nprocs=2)

    model = build_model(tok, seed=0)
    collator = RankedCollator(tok.pad_token_id, padding_free=True)
    losses = [(s / c).sum() for s, c in (sequence_logps(model, collator(f)) for f in features)]
    (sum(losses) / 2).backward()  # both wrappers average the gradients over the processes
    got = torch.load(out)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, **TOL)
