"""`TunaRankTrainer`: a `transformers.Trainer` whose loss is the Tuna ranking loss plus lambda * NLL."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer

from .collator import RankedCollator
from .config import TunaConfig
from .logps import sequence_logps
from .loss import ranking_loss, ranking_normalizer
from .tokenization import TOKENIZED_COLUMNS, prepare_dataset


logger = logging.getLogger(__name__)

_CITATION = """\
@inproceedings{li2023tuna,
    title        = {{Tuna: Instruction Tuning using Feedback from Large Language Models}},
    author       = {Haoran Li and Yiran Liu and Xingxing Zhang and Wei Lu and Furu Wei},
    year         = 2023,
    booktitle    = {Proceedings of the 2023 Conference on Empirical Methods in Natural Language Processing},
    eprint       = {arXiv:2310.13385}
}"""


def _load_model(model: str | PreTrainedModel, args: TunaConfig) -> PreTrainedModel:
    if not isinstance(model, str):
        if args.model_init_kwargs:
            logger.warning("`model_init_kwargs` is ignored: the model is already instantiated.")
        return model
    kwargs = dict(args.model_init_kwargs or {})
    dtype = kwargs.get("dtype", "auto")
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(model, **kwargs)


def _supports_block_mask(model: nn.Module) -> tuple[bool, str]:
    """Whether the prefix-shared layout's 4D mask can be used, and why not when it cannot."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in ("sdpa", "eager"):
        return True, ""
    return False, f"attn_implementation={impl!r} does not take a custom 4D attention mask (use 'sdpa' or 'eager')"


class TunaRankTrainer(Trainer):
    """Trainer for Tuna (arXiv 2310.13385): each example's ranked completions are scored by the model's
    length-normalised log-probability v, and the loss is `ranking_loss(v) + mle_weight * NLL(mle target)`.

    Args:
        model: a `PreTrainedModel` or a model id/path, loaded with `args.model_init_kwargs`.
        args: a `TunaConfig` (default: one with `output_dir="<model name>-Tuna"`).
        data_collator: default `RankedCollator` configured from `args`.
        train_dataset / eval_dataset: `datasets.Dataset` or `IterableDataset` with `prompt`, `completions` (best
            first) and optional `reference` columns, or already tokenized `prompt_ids`, `completion_ids`,
            `reference_ids` columns. `eval_dataset` may be a dict of datasets.
        processing_class: the tokenizer (default: loaded from the model's name or path).
        peft_config: a `peft.PeftConfig`; the model is wrapped with `peft.get_peft_model`.
    """

    _tag_names = ["trl", "tuna"]
    _name = "Tuna"
    _paper = {
        "title": "Tuna: Instruction Tuning using Feedback from Large Language Models",
        "id": "2310.13385",
        "citation": _CITATION,
    }
    # `compute_loss` divides by the example/token counts of the whole accumulated batch (see
    # `_get_num_items_in_batch`), so the Trainer must not divide by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: TunaConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = TunaConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-Tuna")
        model_id = model if isinstance(model, str) else model.config._name_or_path
        model = _load_model(model, args)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model_id)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # processors wrap a tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

        if peft_config is not None:
            from peft import get_peft_model

            if args.gradient_checkpointing:
                model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing from the embeddings
            model = get_peft_model(model, peft_config)

        if data_collator is None:
            padding_free = args.padding_free
            supported, reason = _supports_block_mask(model)
            if padding_free is None:
                padding_free = supported
                if not supported:
                    logger.info("Using the padded batch layout: %s.", reason)
            elif padding_free and not supported:
                raise ValueError(f"padding_free=True needs a custom attention mask, but {reason}.")
            dtype = next(model.parameters()).dtype
            mask_dtype = dtype if getattr(model.config, "_attn_implementation", None) == "eager" else torch.bool
            data_collator = RankedCollator(
                pad_token_id=tokenizer.pad_token_id,
                mle_target=args.mle_target,
                padding_free=padding_free,
                mask_dtype=mask_dtype,
            )

        if train_dataset is not None:
            train_dataset = prepare_dataset(train_dataset, tokenizer, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: prepare_dataset(v, tokenizer, args, k) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = prepare_dataset(eval_dataset, tokenizer, args, "eval")

        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(TOKENIZED_COLUMNS)

    # ----------------------------------------------------------------------------------------------------------
    # Loss
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> dict[str, torch.Tensor] | None:
        """Denominators of the loss over the whole accumulated batch, summed over processes: the number of examples
        (`"sum"` reduction), the pairs at each rank gap (`"gap_mean"`) and the NLL target tokens."""
        if not batch_samples:
            return None
        max_gap = max(int(b["num_completions"].max()) for b in batch_samples) - 1
        if self.accelerator.num_processes > 1:
            max_gap = int(self.accelerator.gather(torch.tensor([max_gap], device=device)).max())
        reduction = self.args.rank_loss_reduction
        counts = [
            torch.cat(
                [
                    ranking_normalizer(b["num_completions"], reduction, max_gap=max_gap).reshape(-1).cpu(),
                    b["seq_mle"][b["target_seq"]].sum().reshape(1).float().cpu(),
                ]
            )
            for b in batch_samples
        ]
        total = torch.stack(counts).sum(0).to(device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return {"rank": total[:-1].squeeze(0) if reduction == "sum" else total[:-1], "mle": total[-1]}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: dict[str, torch.Tensor] | None = None,
    ):
        args = self.args
        sums, counts = sequence_logps(model, inputs, args.logps_chunk_size)
        values = sums / counts.clamp(min=1) if args.length_normalize else sums

        # scatter the ranked sequences into a (B, N) matrix, column k = rank k
        num_completions = inputs["num_completions"]
        ranked = inputs["seq_rank"] >= 0
        v = values.new_zeros(num_completions.shape[0], int(num_completions.max()))
        v = v.index_put((inputs["seq_example"][ranked], inputs["seq_rank"][ranked]), values[ranked])

        mle_mask = inputs["seq_mle"]
        nll_sum = -sums[mle_mask].sum()
        local_tokens = counts[mle_mask].sum().clamp(min=1)
        v_detached = v.detach()
        if num_items_in_batch is None:  # evaluation, or a caller outside the training loop: this batch alone
            rank_loss = ranking_loss(v, num_completions, args.margin, args.rank_loss_reduction)
            mle_loss = nll_sum / local_tokens
            scale = 1.0
            local_rank, local_mle = rank_loss.detach(), mle_loss.detach()
        else:
            norm = num_items_in_batch
            rank_loss = ranking_loss(v, num_completions, args.margin, args.rank_loss_reduction, norm["rank"])
            mle_loss = nll_sum / norm["mle"].clamp(min=1)
            # gradients are averaged over processes, while the denominators above already count all of them
            scale = float(self.accelerator.num_processes)
            with torch.no_grad():  # logged values: this micro-batch's own means, whatever the normalisation
                local_rank = ranking_loss(v_detached, num_completions, args.margin, args.rank_loss_reduction)
                local_mle = nll_sum.detach() / local_tokens
        loss = (rank_loss + args.mle_weight * mle_loss) * scale

        self._record_metrics(v_detached, num_completions, local_rank, local_mle)
        if return_outputs:
            return loss, {"logps": v_detached}
        return loss

    @torch.no_grad()
    def _record_metrics(self, v, num_completions, rank_loss, mle_loss):
        mode = "train" if self.model.training else "eval"
        ranks = torch.arange(v.shape[1], device=v.device)
        valid = ranks[None, :] < num_completions[:, None]
        pair = (ranks[:, None] < ranks[None, :])[None] & valid[:, None, :]  # j < k < n_b
        correct = (v[:, :, None] > v[:, None, :]) & pair
        worst = v.gather(1, (num_completions - 1)[:, None]).squeeze(1)
        stats = torch.stack(
            [
                rank_loss.float(),
                mle_loss.float(),
                correct.sum().float(),
                pair.sum().float(),
                v[:, 0].float().mean(),
                worst.float().mean(),
            ]
        )
        stats = self.accelerator.gather(stats[None]).reshape(-1, stats.numel())
        metrics = self._metrics[mode]
        metrics["loss/rank"].append(stats[:, 0].mean().item())
        metrics["loss/mle"].append(stats[:, 1].mean().item())
        metrics["rank_correct"].append(stats[:, 2].sum().item())
        metrics["rank_pairs"].append(stats[:, 3].sum().item())
        metrics["logps/best"].append(stats[:, 4].mean().item())
        metrics["logps/worst"].append(stats[:, 5].mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, outputs["logps"], torch.zeros(outputs["logps"].shape[0], device=loss.device)

    # ----------------------------------------------------------------------------------------------------------
    # Logging and model card
    def _pop_metrics(self, mode: str) -> dict[str, float]:
        """Average what `compute_loss` recorded since the last call; rank accuracy is pooled over all pairs."""
        metrics = self._metrics[mode]
        averaged = {k: sum(v) / len(v) for k, v in metrics.items() if k not in ("rank_correct", "rank_pairs") and v}
        if metrics.get("rank_pairs"):
            pairs = sum(metrics["rank_pairs"])
            averaged["rank_accuracy"] = sum(metrics["rank_correct"]) / pairs if pairs else float("nan")
        metrics.clear()
        return averaged

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "" if mode == "train" else "eval_"
        logs = {**logs, **{prefix + k: v for k, v in self._pop_metrics(mode).items()}}
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self._metrics["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._pop_metrics("eval").items()})
        return output

    def _save_checkpoint(self, model, trial):
        if self.args.hub_model_id is None:
            model_name = os.path.basename(os.path.normpath(self.args.output_dir))
        else:
            model_name = self.args.hub_model_id.split("/")[-1]
        self.create_model_card(model_name=model_name)
        super()._save_checkpoint(model, trial)

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """Write `README.md` in `output_dir`: base model, dataset, tags `trl`/`tuna`, hyper-parameters, citation."""
        if not self.is_world_process_zero():
            return
        from .model_card import build_model_card

        card = build_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))
