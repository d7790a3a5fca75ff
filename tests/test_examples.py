"""The files under examples/: every accelerate/DeepSpeed config and recipe parses (and a typo fails), the
script's data loading, and the model card it writes and pushes (with a fake Hub: no network)."""

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA = EXAMPLES / "data" / "tiny_ranked.jsonl"
sys.path.insert(0, str(EXAMPLES))

import train_tuna  # noqa: E402


ACCELERATE = sorted((EXAMPLES / "accelerate").glob("*.yaml"))
DEEPSPEED = sorted((EXAMPLES / "deepspeed").glob("*.json"))
# train_tuna.py's recipes (examples/configs/ also holds configs of other tools, e.g. the demo pipeline's)
RECIPES = [EXAMPLES / "configs" / name for name in ("sft.yaml", "tuna_p.yaml", "tuna_c.yaml", "tuna.yaml")]


def test_every_expected_config_is_shipped():
    assert {p.name for p in ACCELERATE} >= {
        "single_gpu.yaml", "multi_gpu.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
        "deepspeed_zero3_offload.yaml", "multi_node.yaml",
    }  # fmt: skip
    assert {p.name for p in DEEPSPEED} >= {"zero2.json", "zero3.json", "zero3_offload.json"}
    assert all(p.exists() for p in RECIPES)
    assert len(DATA.read_text().splitlines()) >= 16


@pytest.mark.parametrize(
    "path", sorted([*EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.json")]), ids=lambda p: str(p.relative_to(EXAMPLES))
)
def test_every_config_file_in_examples_parses(path):
    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, f"{path}: expected a non-empty mapping"


# ---------------------------------------------------------------------------------------------------------------
# accelerate
@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys raise
    raw = yaml.safe_load(path.read_text())
    # `accelerate launch` copies the deepspeed_config keys onto its own arguments without checking them
    launch_args = {action.dest for action in launch_command_parser()._actions}
    unknown = set(raw.get("deepspeed_config") or {}) - launch_args
    assert not unknown, f"{path.name}: deepspeed_config keys that accelerate does not know: {sorted(unknown)}"
    assert config.num_processes % config.num_machines == 0

    ds = raw.get("deepspeed_config")
    if path.name.startswith("deepspeed_zero") or path.name == "multi_node.yaml":
        assert raw["distributed_type"] == "DEEPSPEED"
        stage = ds["zero_stage"]
        assert stage == (2 if "zero2" in path.name else 3)
        if stage == 3:  # an ordinary loadable checkpoint, model created already partitioned
            assert ds["zero3_save_16bit_model"] is True and ds["zero3_init_flag"] is True
        offload = "cpu" if "offload" in path.name else "none"
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == offload
    if path.name == "multi_node.yaml":
        assert config.num_machines > 1 and config.main_process_ip and config.main_process_port
        for field in ("machine_rank", "main_process_ip", "main_process_port", "num_machines", "num_processes"):
            line = next(line for line in path.read_text().splitlines() if line.startswith(f"{field}:"))
            assert "EDIT" in line, f"multi_node.yaml: mark {field} as a field to edit"


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed JSON
@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_config_parses_and_fills_from_training_arguments(path, tmp_path):
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from tuna_trl import TunaConfig
    from tuna_trl.tiny import build_model, build_tokenizer

    raw = json.loads(path.read_text())
    # what TrainingArguments sets is left to it
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert raw[key] == "auto", f"{path.name}: {key} should be 'auto'"
    assert raw["gradient_clipping"] == "auto"
    assert raw["bf16"]["enabled"] == raw["fp16"]["enabled"] == "auto"
    if "optimizer" in raw:
        assert set(raw["optimizer"]["params"].values()) == {"auto"}
    zero = raw["zero_optimization"]
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offload = "cpu" if "offload" in path.name else "none"
    assert zero["offload_optimizer"]["device"] == offload

    # Fill the "auto" values from training arguments and a model, as the Trainer does, then let DeepSpeed validate
    # the result (its ZeRO section rejects unknown keys).
    args = TunaConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2,
                      gradient_accumulation_steps=8, bf16=True, learning_rate=1e-5, report_to=[])  # fmt: skip
    hf_config = HfTrainerDeepSpeedConfig(str(path))
    try:
        hf_config.trainer_config_process(args)
        hf_config.trainer_config_finalize(args, build_model(build_tokenizer()), num_training_steps=10)
        config = DeepSpeedConfig(hf_config.config)
    finally:
        unset_hf_deepspeed_config()
    assert config.train_batch_size == 16 and config.gradient_accumulation_steps == 8
    assert config.bfloat16_config.enabled and not config.float16_config.enabled
    assert config.zero_config.stage == zero["stage"]
    assert torch.tensor(config.gradient_clipping) == args.max_grad_norm


# ---------------------------------------------------------------------------------------------------------------
# Recipes
def _recipe_fields():
    from trl import ModelConfig

    from tuna_trl import TunaConfig

    return {f.name for cls in (train_tuna.ScriptArguments, TunaConfig, ModelConfig) for f in dataclasses.fields(cls)}


def parse_recipe(path, *extra):
    # bf16 is validated against the hardware: the recipes are for GPUs, this test runs on a CPU
    return train_tuna.parse_args(["--config", str(path), "--use_cpu", "true", *extra])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_fields_exist_and_follow_the_paper(path):
    recipe = yaml.safe_load(path.read_text())
    unknown = set(recipe) - _recipe_fields()
    assert not unknown, f"{path.name}: not a field of ScriptArguments, TunaConfig or ModelConfig: {sorted(unknown)}"

    script_args, args, model_args = parse_recipe(path)
    for key, value in recipe.items():  # every value reached its dataclass
        holder = next(obj for obj in (script_args, args, model_args) if hasattr(obj, key))
        assert getattr(holder, key) == value or str(getattr(holder, key)) == str(value), key

    # the paper's recipe: global batch 128 on 8 GPUs, 1 epoch, 2 warm-up steps, AdamW (0.9, 0.999), margin 0.1,
    # lambda 1, max length 512, bf16, gradient checkpointing
    assert 8 * args.per_device_train_batch_size * args.gradient_accumulation_steps == 128
    assert args.num_train_epochs == 1 and args.warmup_steps == 2
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.999) and args.optim == "adamw_torch"
    assert args.margin == 0.1 and args.mle_weight == 1.0 and args.max_length == 512
    assert args.bf16 and args.gradient_checkpointing
    expected_lr = {"sft.yaml": 2e-5, "tuna_p.yaml": 1e-5, "tuna_c.yaml": 1e-5, "tuna.yaml": 1e-6}
    assert args.learning_rate == expected_lr[path.name]
    assert model_args.model_name_or_path and script_args.dataset_name and args.output_dir


def test_recipe_with_a_typo_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "configs" / "tuna_p.yaml").read_text().replace("learning_rate:", "learning_rat:"))
    assert "learning_rat" not in _recipe_fields()
    with pytest.raises(ValueError, match="learning_rat"):
        parse_recipe(bad)


def test_command_line_overrides_recipe_and_output_dir_default():
    _, args, _ = parse_recipe(EXAMPLES / "configs" / "tuna_p.yaml", "--learning_rate", "3e-6")
    assert args.learning_rate == 3e-6 and args.output_dir == "llama-7b-tuna-p"
    _, args, _ = train_tuna.parse_args(["--model_name_or_path", "huggyllama/llama-7b", "--dataset_name", "x.jsonl"])
    assert args.output_dir == "llama-7b-Tuna"
    _, args, _ = train_tuna.parse_args(["--model_name_or_path", "m", "--output_dir", "runs/a"])
    assert args.output_dir == "runs/a"


# ---------------------------------------------------------------------------------------------------------------
# Data loading
def test_load_jsonl_file_directory_and_eval_splits(tmp_path):
    from datasets import load_dataset

    rows = load_dataset("json", data_files=str(DATA), split="train")
    script = train_tuna.ScriptArguments(dataset_name=str(DATA), eval_split="0.25")
    train, evaluation = train_tuna.load_train_eval(script, seed=0)
    assert len(train) + len(evaluation) == len(rows) and len(evaluation) == 6
    assert {"prompt", "completions"} <= set(train.column_names)

    saved = tmp_path / "saved"  # a `save_to_disk` directory with train/test splits
    rows.train_test_split(test_size=4, seed=0).save_to_disk(str(saved))
    train, evaluation = train_tuna.load_train_eval(train_tuna.ScriptArguments(str(saved), eval_split="test"), seed=0)
    assert (len(train), len(evaluation)) == (len(rows) - 4, 4)

    files = tmp_path / "files"  # a directory of data files
    files.mkdir()
    (files / "train.jsonl").write_text(DATA.read_text())
    script = train_tuna.ScriptArguments(str(files), eval_split=str(DATA))
    train, evaluation = train_tuna.load_train_eval(script, seed=0)
    assert len(train) == len(evaluation) == len(rows)

    with pytest.raises(ValueError, match="fraction"):
        train_tuna.load_train_eval(train_tuna.ScriptArguments(str(DATA), eval_split="1.5"), seed=0)


def test_alpaca_rows_become_one_completion_rows(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    ]))  # fmt: skip
    rows = train_tuna.load_ranked_dataset(str(alpaca))
    assert rows.column_names == ["prompt", "completions"]
    assert rows[0]["prompt"].endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    assert "### Input:\ncat\n\n### Response:\n" in rows[1]["prompt"] and rows[1]["completions"] == ["chat"]


# ---------------------------------------------------------------------------------------------------------------
# Model card and push (a fake Hub)
class FakeHub:
    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        card = (Path(folder_path) / "README.md").read_text()
        self.uploads.append({"repo_id": repo_id, "files": files, "card": card})


def test_push_to_hub_writes_the_model_card(tmp_path, monkeypatch):
    import datasets

    from tuna_trl.tiny import save_tiny

    hub = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    real_load_dataset = datasets.load_dataset

    def load_dataset(name, *args, **kwargs):  # "tuna-trl/tiny-ranked" is served from the shipped sample
        if name == "tuna-trl/tiny-ranked":
            return real_load_dataset("json", data_files=str(DATA), split=kwargs.get("split", "train"))
        return real_load_dataset(name, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    model = save_tiny(str(tmp_path / "tiny"))
    out = tmp_path / "out"
    argv = ["--model_name_or_path", model, "--dataset_name", "tuna-trl/tiny-ranked", "--output_dir", str(out),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none",
            "--save_strategy", "no", "--push_to_hub", "--hub_model_id", "me/tiny-tuna", "--margin", "0.2",
            "--disable_tqdm", "true"]  # fmt: skip
    train_tuna.main(*train_tuna.parse_args(argv))

    assert hub.repos == ["me/tiny-tuna"]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/tiny-tuna"
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= set(upload["files"])
    card = upload["card"]
    header = yaml.safe_load(card.split("---")[1])
    assert {"trl", "tuna"} <= set(header["tags"])
    assert header["datasets"] in ("tuna-trl/tiny-ranked", ["tuna-trl/tiny-ranked"])  # a str or a list: both valid
    assert header["model_name"] == "tiny-tuna"
    assert "huggingface.co/datasets/tuna-trl/tiny-ranked" in card
    assert "| margin | 0.2 |" in card and "| total_train_batch_size | 2 |" in card
    assert "arXiv:2310.13385" in card and "li2023tuna" in card  # the paper's citation
    assert 'pipeline("text-generation", model="me/tiny-tuna")' in card
    assert (out / "README.md").read_text() == card


def test_model_card_names_a_hub_base_model_and_skips_local_paths(tmp_path):
    from tuna_trl.tiny import save_tiny

    model = save_tiny(str(tmp_path / "tiny"))
    script = train_tuna.ScriptArguments(dataset_name=str(DATA))
    argv = ["--model_name_or_path", model, "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    _, args, model_args = train_tuna.parse_args(argv)
    trainer = train_tuna.build_trainer(script, args, model_args)
    trainer.create_model_card(model_name="local", dataset_name=train_tuna.hub_dataset_name(script.dataset_name))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model" not in card.split("---")[1] and "datasets" not in card.split("---")[1]  # local paths
    trainer.model.config._name_or_path = "huggyllama/llama-7b"  # as if loaded from the Hub
    trainer.create_model_card(model_name="hub", dataset_name="tatsu-lab/alpaca")
    header = yaml.safe_load((tmp_path / "out" / "README.md").read_text().split("---")[1])
    assert header["base_model"] == "huggyllama/llama-7b"
    assert header["datasets"] in ("tatsu-lab/alpaca", ["tatsu-lab/alpaca"])
