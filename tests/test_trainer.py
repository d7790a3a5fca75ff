"""TunaRankTrainer against an independent reference, gradient accumulation, learning, LoRA and resume."""

import json
import math
import os
import random

import pytest
import torch
from datasets import Dataset

from tuna_trl import RankedCollator, TunaConfig, TunaRankTrainer
from tuna_trl.tokenization import tokenize_row


def make_args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no",
                    logging_steps=1, seed=0, disable_tqdm=True)  # fmt: skip
    return TunaConfig(**{**defaults, **kwargs})


def reference_loss(model, tokenizer, rows, margin=0.1, mle_weight=1.0, mle_target="reference"):
    """One unpadded forward per (prompt, completion): the definition of the loss, written independently."""
    v_rows, nll_sum, nll_tokens = [], 0.0, 0
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]

        def seq_logp(text):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            full = torch.tensor([prompt + ids])
            logits = model(full).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1).gather(-1, full[0, 1:, None]).squeeze(-1)
            completion = logp[len(prompt) - 1 :]
            assert len(completion) == len(ids)
            return completion.sum(), len(ids)

        scored = [seq_logp(c) for c in row["completions"]]
        v_rows.append([s / n for s, n in scored])
        if mle_target == "all":
            targets = scored
        elif mle_target == "reference" and row.get("reference"):
            targets = [seq_logp(row["reference"])]
        else:
            targets = [scored[0]]
        nll_sum -= sum(s for s, _ in targets)
        nll_tokens += sum(n for _, n in targets)
    rank = 0.0
    for v in v_rows:
        for j in range(len(v)):
            for k in range(j + 1, len(v)):
                rank += torch.relu(v[k] - v[j] + margin * (k - j))
    return rank / len(rows) + mle_weight * nll_sum / nll_tokens, v_rows


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("mle_target", ["reference", "best", "all"])
def test_compute_loss_matches_unpadded_reference(tmp_path, tokenizer, make_model, ranked_rows, padding_free, mle_target):
    model = make_model(seed=1)
    args = make_args(tmp_path, padding_free=padding_free, mle_target=mle_target, mle_weight=0.7, margin=0.3)
    trainer = TunaRankTrainer(model, args=args, processing_class=tokenizer)
    features = [tokenize_row(r, tokenizer, i) for i, r in enumerate(ranked_rows)]
    batch = trainer.data_collator(features)
    model.eval()
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
        want, v_rows = reference_loss(model, tokenizer, ranked_rows, 0.3, 0.7, mle_target)
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    for b, v in enumerate(v_rows):
        assert out["logps"][b, : len(v)].tolist() == pytest.approx([x.item() for x in v], abs=1e-5)


def test_per_example_scores_do_not_depend_on_padding_or_batch(tokenizer, make_model, ranked_rows):
    model = make_model(seed=2).eval()
    from tuna_trl.logps import sequence_logps

    features = [tokenize_row(r, tokenizer, i) for i, r in enumerate(ranked_rows)]

    def scores(collator, feats):
        batch = collator(feats)
        with torch.no_grad():
            sums, counts = sequence_logps(model, batch)
        v = sums / counts
        keep = batch["seq_rank"] >= 0
        return {(int(e), int(k)): float(x) for e, k, x in zip(batch["seq_example"][keep], batch["seq_rank"][keep], v[keep])}

    alone = {}
    for i, f in enumerate(features):
        for (_, k), x in scores(RankedCollator(tokenizer.pad_token_id), [f]).items():
            alone[(i, k)] = x
    order = [4, 0, 3, 1, 2]
    for padding_free in (False, True):
        for side in ("left", "right"):
            collator = RankedCollator(tokenizer.pad_token_id, padding_free=padding_free, padding_side=side)
            got = scores(collator, [features[i] for i in order])
            for (pos, k), x in got.items():
                assert x == pytest.approx(alone[(order[pos], k)], abs=1e-5), (padding_free, side, pos, k)


def synthetic_rows(n, seed):
    """A learnable ranking: completion k repeats the prompt's keyword 3 - k times among filler words."""
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "green", "music", "table", "light", "paper", "glass"]
    rows = []
    for _ in range(n):
        key = rng.choice(words)
        completions = []
        for k in range(4):
            seq = [key] * (3 - k) + ["the"] * k
            rng.shuffle(seq)
            completions.append(" ".join(seq))
        rows.append({"prompt": f"say {key} three times", "completions": completions, "reference": None})
    return rows


def test_gradient_accumulation_gives_the_same_update(tmp_path, tokenizer, make_model, ranked_rows):
    rows = ranked_rows[:4]
    dataset = Dataset.from_list(rows)

    def update(per_device, accumulation, reduction):
        model = make_model(seed=3)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = make_args(tmp_path, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                         max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0,
                         max_grad_norm=0.0, rank_loss_reduction=reduction, margin=1.0)  # fmt: skip
        trainer = TunaRankTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        trainer.train()
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}, trainer.state.log_history[0]["loss"]

    for reduction in ("sum", "gap_mean"):
        whole, loss_whole = update(4, 1, reduction)
        split, loss_split = update(2, 2, reduction)
        assert loss_split == pytest.approx(loss_whole, abs=1e-5)
        assert max((whole[n] - split[n]).abs().max().item() for n in whole) < 1e-5
        assert max(d.abs().max().item() for d in whole.values()) > 1e-4  # the step did move the weights


def test_learns_a_ranking(tmp_path, tokenizer, make_model):
    train, held_out = Dataset.from_list(synthetic_rows(256, 0)), Dataset.from_list(synthetic_rows(64, 1))
    args = make_args(tmp_path, per_device_train_batch_size=16, per_device_eval_batch_size=32, num_train_epochs=3,
                     learning_rate=3e-3, warmup_steps=0, logging_steps=50, mle_weight=0.2)  # fmt: skip
    trainer = TunaRankTrainer(make_model(seed=4, hidden_size=64), args=args, train_dataset=train,
                              eval_dataset=held_out, processing_class=tokenizer)  # fmt: skip
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_rank_accuracy"] < 0.7
    assert after["eval_rank_accuracy"] > 0.9
    for key in ("loss/rank", "loss/mle", "rank_accuracy", "logps/best", "logps/worst"):
        assert key in trainer.state.log_history[0] and f"eval_{key}" in after


def test_lora_save_load_and_resume(tmp_path, tokenizer, make_model):
    from peft import AutoPeftModelForCausalLM, LoraConfig

    from transformers import AutoModelForCausalLM

    base = str(tmp_path / "base")  # the adapter records its base model's path
    make_model(seed=5).save_pretrained(base)
    dataset = Dataset.from_list(synthetic_rows(32, 0))
    args = make_args(tmp_path, per_device_train_batch_size=4, max_steps=6, save_strategy="steps", save_steps=3,
                     learning_rate=1e-2)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = TunaRankTrainer(AutoModelForCausalLM.from_pretrained(base), args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora)  # fmt: skip
    trainer.train()
    trained_logits = trainer.model(torch.tensor([[1, 5, 9, 12]])).logits
    trainer.save_model(args.output_dir)
    assert os.path.exists(os.path.join(args.output_dir, "adapter_config.json"))
    loaded = AutoPeftModelForCausalLM.from_pretrained(args.output_dir)
    assert torch.allclose(loaded(torch.tensor([[1, 5, 9, 12]])).logits, trained_logits, atol=1e-5)
    card = open(os.path.join(args.output_dir, "README.md")).read()
    assert "tuna" in card and "2310.13385" in card and "li2023tuna" in card

    # resume from the step-3 checkpoint: the run continues at step 4 and ends at 6 with the same losses
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    resumed = TunaRankTrainer(AutoModelForCausalLM.from_pretrained(base), args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora)  # fmt: skip
    resumed.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # 1-3 come from the checkpoint's state, 4-6 are new
    for h in resumed.state.log_history:
        if "loss" in h:
            assert h["loss"] == pytest.approx(losses[h["step"]], abs=1e-5)


def test_model_id_string_and_defaults(tmp_path, tokenizer, make_model):
    path = str(tmp_path / "tiny")
    make_model(seed=6).save_pretrained(path)
    tokenizer.save_pretrained(path)
    args = make_args(tmp_path, model_init_kwargs={"dtype": "float32"}, max_steps=1)
    trainer = TunaRankTrainer(path, args=args, train_dataset=Dataset.from_list(synthetic_rows(4, 0)))
    assert trainer.processing_class.eos_token == tokenizer.eos_token
    trainer.train()
    config = TunaConfig(output_dir=str(tmp_path / "d"))
    assert (config.learning_rate, config.num_train_epochs, config.warmup_steps) == (1e-5, 1.0, 2)
    assert (config.margin, config.mle_weight, config.rank_loss_reduction, config.mle_target) == (0.1, 1.0, "sum", "reference")
