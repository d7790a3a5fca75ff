"""`examples/train_tuna.py` in real processes on the CPU (gloo): 2-process DeepSpeed ZeRO-3 / ZeRO-2 runs against a
single-process run with the same global batch and seed, the saved checkpoints, LoRA, and resuming.

Each test launches as few processes as it can: a DeepSpeed launch costs ~20-40 s on 2 CPU cores. The first
DeepSpeed launch on a machine also JIT-compiles DeepSpeed's shared-memory comm op once (~1-2 min, then cached in
~/.cache/torch_extensions).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_tuna.py"
DATA = ROOT / "examples" / "data" / "tiny_ranked.jsonl"
BIN = Path(sys.executable).parent
TOL = 1e-4

# 24 rows, 6 held out for evaluation at steps 2 and 4; global batch 4 = 1 process x 4 = 2 processes x 1 per device
# x 2 accumulation steps (so both data parallelism and gradient accumulation are in play); checkpoints at steps
# 2 and 4.
COMMON = [
    "--dataset_name", str(DATA), "--eval_split", "0.25", "--eval_strategy", "steps", "--eval_steps", "2",
    "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--warmup_steps", "1",
    "--seed", "0", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--max_length", "64",
]  # fmt: skip
SINGLE = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
          "--per_device_eval_batch_size", "6"]  # fmt: skip
TWO_PROCESSES = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
                 "--per_device_eval_batch_size", "3"]  # fmt: skip
LORA = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
        "--lora_target_modules", "all-linear"]  # fmt: skip


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true",
        HF_DATASETS_CACHE=str(tmp / "datasets_cache"), PYTHONPATH=str(ROOT),
    )  # fmt: skip
    env.pop("ACCELERATE_CONFIG_FILE", None)  # a user's own accelerate config must not leak into the test
    return env


def run(cmd: list, tmp: Path, timeout: int = 420) -> str:
    """Run `cmd` (a launcher + the example script) from `tmp`; fail the test with the output's tail otherwise."""
    proc = subprocess.run(
        ["nice", "-n", "5", *map(str, cmd)], cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        # DeepSpeed's deprecation warnings drown the error: leave them out of the message
        lines = [line for line in output.splitlines() if "Warning" not in line and "return func(" not in line]
        tail = "\n".join(lines[-120:])
        pytest.fail(f"{' '.join(map(str, cmd))}\nexited with {proc.returncode}:\n{tail}")
    return output


def python_run(tmp, out, *args):
    return run([sys.executable, SCRIPT, *COMMON, *SINGLE, "--output_dir", out, *args], tmp)


def accelerate_run(tmp, out, config, *args):
    cmd = [BIN / "accelerate", "launch", "--config_file", ROOT / "examples" / "accelerate" / config,
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", _free_port()]  # fmt: skip
    return run([*cmd, SCRIPT, *COMMON, *TWO_PROCESSES, "--output_dir", out, *args], tmp)


def torchrun_run(tmp, out, ds_config, *args):
    cmd = [BIN / "torchrun", "--nproc_per_node", "2", "--master_port", _free_port()]
    ds = ["--deepspeed", ROOT / "examples" / "deepspeed" / ds_config, "--ddp_backend", "gloo"]
    return run([*cmd, SCRIPT, *COMMON, *TWO_PROCESSES, *ds, "--output_dir", out, *args], tmp)


def train_logs(out: Path, key="loss") -> dict[int, dict]:
    """step -> the training (or, with key="eval_loss", evaluation) log of that step, from trainer_state.json."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in history if key in entry}


def assert_same_logs(logs, expected, steps):
    assert sorted(logs) == list(steps), f"logged steps {sorted(logs)}, expected {list(steps)}"
    for step in steps:
        for key in ("loss", "grad_norm"):  # grad_norm catches a wrongly scaled gradient that Adam would hide
            assert logs[step][key] == pytest.approx(expected[step][key], abs=TOL, rel=TOL), (step, key)


def assert_same_eval(out, reference):
    """Evaluation on 2 processes x 3 examples = 1 process x 6. Only metrics that are means over examples (or pooled
    over pairs) are comparable: eval_loss averages per-batch token means, which depend on how the batch is split."""
    logs, expected = train_logs(out, "eval_loss"), train_logs(reference, "eval_loss")
    assert sorted(logs) == sorted(expected) == [2, 4]
    for step in (2, 4):
        for key in ("eval_rank_accuracy", "eval_loss/rank", "eval_logps/best", "eval_logps/worst"):
            assert logs[step][key] == pytest.approx(expected[step][key], abs=TOL, rel=TOL), (step, key)


@torch.no_grad()
def logits_of(model, tokenizer):
    text = ["Reverse the letters of the word 'tiger'. The reversed word is 'regit'."]
    return model.eval()(**tokenizer(text, return_tensors="pt")).logits


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tuna_trl.tiny import save_tiny

    return Path(save_tiny(str(tmp_path_factory.mktemp("tiny") / "model")))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def reference(tiny, workdir):
    """The single-process full fine-tuning run everything below is compared with."""
    out = workdir / "single"
    python_run(workdir, out, "--model_name_or_path", tiny)
    return out


def test_zero3_matches_single_process_saves_loadable_checkpoint_and_resumes(tiny, workdir, reference):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoTokenizer

    # The user story: accelerate launch with the shipped ZeRO-3 config.
    out = workdir / "zero3"
    accelerate_run(workdir, out, "deepspeed_zero3.yaml", "--model_name_or_path", tiny)
    expected = train_logs(reference)
    assert_same_logs(train_logs(out), expected, steps=[1, 2, 3, 4])
    assert_same_eval(out, reference)

    # The final model was gathered from the ZeRO-3 shards into an ordinary checkpoint: it loads with
    # from_pretrained and equals both DeepSpeed's own fp32 master weights and the single-process model.
    tokenizer = AutoTokenizer.from_pretrained(out)
    saved = load(out)
    master = load(tiny)
    master.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-4")))
    torch.testing.assert_close(logits_of(saved, tokenizer), logits_of(master, tokenizer), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits_of(saved, tokenizer), logits_of(load(reference), tokenizer), atol=TOL, rtol=0)
    assert not torch.equal(logits_of(saved, tokenizer), logits_of(load(tiny), tokenizer)), "the model did not train"

    # Resume the 2-process run from its step-2 checkpoint, under torchrun with the shipped DeepSpeed JSON: it
    # continues at step 3 and retraces steps 3 and 4 (optimizer, scheduler, RNG and data position restored).
    resumed = workdir / "zero3_resumed"
    torchrun_run(
        workdir, resumed, "zero3.json", "--model_name_or_path", tiny, "--resume_from_checkpoint", out / "checkpoint-2"
    )
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # steps 1-2 come from the checkpoint's history, logged once each: training did not restart from step 1
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]
    assert_same_logs(train_logs(resumed), expected, steps=[1, 2, 3, 4])
    torch.testing.assert_close(logits_of(load(resumed), tokenizer), logits_of(saved, tokenizer), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        "deepspeed_zero2.yaml",
        # parameters and optimizer states in CPU RAM: accelerate swaps the torch AdamW for DeepSpeed's CPU Adam,
        # which DeepSpeed JIT-compiles on first use (minutes)
        pytest.param("deepspeed_zero3_offload.yaml", marks=pytest.mark.slow),
    ],
)
def test_other_zero_configs_match_single_process(tiny, workdir, reference, config):
    from transformers import AutoTokenizer

    out = workdir / config.removesuffix(".yaml")
    accelerate_run(workdir, out, config, "--model_name_or_path", tiny)
    assert_same_logs(train_logs(out), train_logs(reference), steps=[1, 2, 3, 4])
    tokenizer = AutoTokenizer.from_pretrained(out)
    expected = logits_of(load(reference), tokenizer)
    torch.testing.assert_close(logits_of(load(out), tokenizer), expected, atol=TOL, rtol=0)


def test_lora_zero3_matches_single_process(tiny, workdir):
    from transformers import AutoTokenizer

    single = workdir / "lora_single"
    python_run(workdir, single, "--model_name_or_path", tiny, *LORA)
    out = workdir / "lora_zero3"
    torchrun_run(workdir, out, "zero3.json", "--model_name_or_path", tiny, *LORA)
    assert_same_logs(train_logs(out), train_logs(single), steps=[1, 2, 3, 4])

    # An adapter, not a full model, was saved; from_pretrained puts it on its base model.
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    adapted = logits_of(load(out), tokenizer)
    torch.testing.assert_close(adapted, logits_of(load(single), tokenizer), atol=TOL, rtol=0)
    assert not torch.allclose(adapted, logits_of(load(tiny), tokenizer)), "the adapter did not train"
    card = (out / "README.md").read_text()
    assert "| peft | LoraConfig |" in card and "| world_size | 2 |" in card
    assert "| total_train_batch_size | 4 |" in card


@pytest.mark.slow
def test_ddp_matches_single_process(tiny, workdir, reference):
    """Plain DDP (torchrun, no DeepSpeed), the multi_gpu.yaml setup."""
    out = workdir / "ddp"
    cmd = [BIN / "torchrun", "--nproc_per_node", "2", "--master_port", _free_port(), SCRIPT]
    run([*cmd, *COMMON, *TWO_PROCESSES, "--ddp_backend", "gloo", "--output_dir", out, "--model_name_or_path", tiny],
        workdir)  # fmt: skip
    assert_same_logs(train_logs(out), train_logs(reference), steps=[1, 2, 3, 4])
