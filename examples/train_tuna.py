"""Train a causal LM with Tuna (arXiv 2310.13385) on ranked data: `TunaRankTrainer` behind a TRL-style command line.

The same script runs on one CPU or GPU, under `torchrun` and under `accelerate launch` (DDP or DeepSpeed ZeRO):

```bash
# one GPU (or CPU: add --use_cpu true)
python examples/train_tuna.py --config examples/configs/tuna_p.yaml \
    --model_name_or_path ./llama-7b-alpaca-sft --dataset_name ranked_p.jsonl

# 8 GPUs, DeepSpeed ZeRO-3 (see docs/distributed.md for which config to choose)
accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml examples/train_tuna.py \
    --config examples/configs/tuna_p.yaml
torchrun --nproc_per_node 8 examples/train_tuna.py --config examples/configs/tuna_p.yaml \
    --deepspeed examples/deepspeed/zero3.json

# LoRA, evaluation on 5% held out, and a push of the result (with its model card) to the Hub
python examples/train_tuna.py --config examples/configs/tuna_p.yaml --use_peft --lora_r 16 \
    --eval_split 0.05 --eval_strategy steps --eval_steps 50 --push_to_hub --hub_model_id me/llama-7b-tuna-p
```

Arguments come from three dataclasses, from the command line and/or a YAML file given with `--config` (the command
line wins): `ScriptArguments` below (data), `tuna_trl.TunaConfig` (training, every `TrainingArguments` field plus
Tuna's) and `trl.ModelConfig` (`--model_name_or_path`, `--dtype`, `--attn_implementation` and the PEFT options
`--use_peft`, `--lora_r`, `--lora_alpha`, `--lora_dropout`, `--lora_target_modules`, ...). `--help` lists them all.

Data: rows with `prompt`, `completions` (best first) and an optional `reference`, the format of `tuna-trl generate`.
Alpaca-style rows (`instruction`, `input`, `output`) are turned into one-completion rows with the Alpaca prompt,
for which the Tuna loss reduces to the SFT loss: that is how `examples/configs/sft.yaml` trains the first stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class ScriptArguments:
    """Where the ranked data comes from."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "The ranked data: a Hub dataset id, a local directory (`save_to_disk` output or data files) or "
            "a .json/.jsonl file. Rows: `prompt`, `completions` (best first), optional `reference`; or Alpaca-style "
            "`instruction`, `input`, `output`."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of a Hub dataset (`name` of `datasets.load_dataset`)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data: a split name of the same dataset, a fraction in (0, 1) held out from the "
            "training split (seeded with --seed), or a .json/.jsonl file. None: no evaluation."
        },
    )


# The Stanford Alpaca prompt, so that Alpaca-format data trains the SFT stage without a conversion step.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def alpaca_to_ranked(row: dict) -> dict:
    """An Alpaca row (`instruction`, `input`, `output`) as a one-completion ranked row."""
    if row.get("input"):
        prompt = ALPACA_PROMPT.format(
            context=", paired with an input that provides further context",
            instruction=row["instruction"],
            input_block=f"### Input:\n{row['input']}\n\n",
        )
    else:
        prompt = ALPACA_PROMPT.format(context="", instruction=row["instruction"], input_block="")
    return {"prompt": prompt, "completions": [row["output"]]}


def _is_data_file(path: str) -> bool:
    return path.endswith((".json", ".jsonl")) and os.path.isfile(path)


def load_ranked_dataset(name: str, config: str | None = None, split: str = "train"):
    """Load one split of a Hub dataset, a local directory or a .json/.jsonl file, in the ranked format."""
    from datasets import load_dataset, load_from_disk

    if _is_data_file(name):
        dataset = load_dataset("json", data_files=name, split="train")  # a single file is one split
    elif os.path.isdir(name) and any(
        os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")
    ):  # written by `save_to_disk`
        dataset = load_from_disk(name)
        dataset = dataset[split] if hasattr(dataset, "keys") else dataset
    else:  # a Hub id, or a directory of data files
        dataset = load_dataset(name, config, split=split)
    columns = dataset.column_names
    if "prompt" not in columns and "prompt_ids" not in columns and {"instruction", "output"} <= set(columns):
        dataset = dataset.map(alpaca_to_ranked, remove_columns=columns, desc="Alpaca rows -> ranked rows")
    return dataset


def load_train_eval(script_args: ScriptArguments, seed: int):
    """The training split, and the evaluation set `--eval_split` asks for (or None)."""
    train = load_ranked_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_split)
    eval_split = script_args.eval_split
    if eval_split is None:
        return train, None
    try:
        fraction = float(eval_split)
    except ValueError:
        fraction = None
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(f"--eval_split {eval_split}: a held-out fraction must be in (0, 1).")
        split = train.train_test_split(test_size=fraction, seed=seed)
        return split["train"], split["test"]
    if eval_split.endswith((".json", ".jsonl")):
        if not os.path.isfile(eval_split):
            raise FileNotFoundError(f"--eval_split {eval_split}: no such file.")
        return train, load_ranked_dataset(eval_split)
    return train, load_ranked_dataset(script_args.dataset_name, script_args.dataset_config, eval_split)


def hub_dataset_name(name: str | None) -> str | None:
    """The dataset id the model card links to: a Hub id, not a local path (which means nothing on the Hub)."""
    if not name or os.path.exists(name):
        return None
    return name


def default_output_dir(model_name_or_path: str) -> str:
    return f"{os.path.basename(os.path.normpath(model_name_or_path))}-Tuna"


def build_trainer(script_args, training_args, model_args):
    """The `TunaRankTrainer` the arguments describe (model loaded by the trainer, so ZeRO-3 can partition it)."""
    from trl import get_peft_config, get_quantization_config

    from tuna_trl import TunaRankTrainer

    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required (a Hub id or a local directory).")
    if script_args.dataset_name is None:
        raise ValueError("--dataset_name is required (a Hub id, a local directory or a .json/.jsonl file).")
    model_init_kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        model_init_kwargs["attn_implementation"] = model_args.attn_implementation
    quantization_config = get_quantization_config(model_args)  # --load_in_4bit / --load_in_8bit (QLoRA; bitsandbytes)
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    train_dataset, eval_dataset = load_train_eval(script_args, training_args.seed)
    return TunaRankTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )


def init_deepspeed_comm(training_args) -> None:
    """Start DeepSpeed's communication before the model is built under `--deepspeed` on several CPU processes.

    transformers starts it itself on accelerators only. With `--use_cpu` (gloo), ZeRO-3's partitioned model creation
    would otherwise count one process instead of all of them and fail DeepSpeed's batch-size check. `accelerate
    launch` does not need this; it is harmless there.
    """
    if not training_args.deepspeed or training_args.world_size < 2:
        return
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=training_args.ddp_backend or "gloo", auto_mpi_discovery=False)


def main(script_args, training_args, model_args):
    from transformers import set_seed

    # The Trainer seeds itself only after `TunaRankTrainer` has built the model: seed first, so that a LoRA
    # adapter's random initialisation is the same on every process and in every run with this seed.
    set_seed(training_args.seed)
    init_deepspeed_comm(training_args)
    trainer = build_trainer(script_args, training_args, model_args)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()  # trainer_state.json: the full log history, next to the final model
    if trainer.eval_dataset is not None and training_args.eval_strategy == "no":
        metrics = trainer.evaluate()  # no evaluation during training was asked for: evaluate the final model once
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    # Every process calls these: under ZeRO-3 they all take part in gathering the weights into one checkpoint
    # (stage3_gather_16bit_weights_on_model_save); only the main process writes and uploads.
    dataset_name = hub_dataset_name(script_args.dataset_name)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)  # saves the model (or adapter) and the card, then uploads
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}.")
    else:
        trainer.save_model(training_args.output_dir)
        model_name = os.path.basename(os.path.normpath(training_args.output_dir))
        trainer.create_model_card(model_name=model_name, dataset_name=dataset_name)
        trainer.accelerator.print(f"Model and model card saved to {training_args.output_dir}.")
    # Tear down in order, while the interpreter is fully alive: free the model, the optimizer and DeepSpeed's engine
    # (with any collective it still has in flight), then destroy the process group. Left to interpreter shutdown,
    # gloo work still holding tensors aborts the process now and then ("terminate called without an active
    # exception"), after everything is saved but with a failing exit status.
    accelerator = trainer.accelerator
    del trainer
    accelerator.free_memory()  # also runs the garbage collector: the engine's reference cycles go now
    accelerator.wait_for_everyone()
    accelerator.end_training()  # = Trainer.end(): finish the trackers, destroy the process group


def make_parser():
    from trl import ModelConfig, TrlParser

    from tuna_trl import TunaConfig

    parser = TrlParser((ScriptArguments, TunaConfig, ModelConfig))
    # An empty default stands for "not given": it becomes <model name>-Tuna once the model is known.
    parser.set_defaults(output_dir="")
    return parser


def parse_args(argv=None):
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    if not training_args.output_dir and model_args.model_name_or_path:
        training_args.output_dir = default_output_dir(model_args.model_name_or_path)
    return script_args, training_args, model_args


if __name__ == "__main__":
    main(*parse_args())
