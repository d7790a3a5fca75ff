"""The model card `TunaRankTrainer` writes next to its checkpoints and pushes to the Hub."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files

from huggingface_hub import ModelCard, ModelCardData


_HYPERPARAMETERS = [
    "learning_rate", "num_train_epochs", "max_steps", "warmup_steps", "lr_scheduler_type", "optim", "adam_beta1",
    "adam_beta2", "weight_decay", "seed", "margin", "mle_weight", "rank_loss_reduction", "mle_target",
    "length_normalize", "max_length", "max_prompt_length", "max_completions", "bf16", "fp16",
]  # fmt: skip


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _base_model(model) -> str | None:
    config = getattr(model, "peft_config", None)
    if config:  # a PEFT model: its adapters name the base model
        name = next(iter(config.values())).base_model_name_or_path
    else:
        name = getattr(model.config, "_name_or_path", None)
    # a local path says nothing to a Hub reader
    return name if name and not os.path.isdir(name) else None


def build_model_card(trainer, model_name=None, dataset_name=None, tags=None) -> ModelCard:
    """A `ModelCard` with the base model, dataset, tags (`trl`, `tuna` + `tags`), hyper-parameters and citation."""
    args = trainer.args
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags = sorted({*trainer._tag_names, *tags, "generated_from_trainer"})
    base_model = _base_model(trainer.model)
    model_name = model_name or os.path.basename(os.path.normpath(args.output_dir))
    hyperparameters = {key: getattr(args, key) for key in _HYPERPARAMETERS if hasattr(args, key)}
    hyperparameters["per_device_train_batch_size"] = args.per_device_train_batch_size
    hyperparameters["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    hyperparameters["world_size"] = args.world_size
    hyperparameters["total_train_batch_size"] = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    )
    if getattr(trainer.model, "peft_config", None):
        hyperparameters["peft"] = type(next(iter(trainer.model.peft_config.values()))).__name__
    card_data = ModelCardData(
        base_model=base_model, datasets=dataset_name, library_name="transformers", model_name=model_name, tags=tags
    )
    template = files("tuna_trl").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        base_model=base_model,
        dataset_name=dataset_name,
        hub_model_id=args.hub_model_id,
        paper_title=trainer._paper["title"],
        paper_id=trainer._paper["id"],
        citation=trainer._paper["citation"],
        hyperparameters=hyperparameters,
        versions={p: _version(p) for p in ("tuna-trl", "trl", "transformers", "torch", "datasets", "tokenizers")},
    )
