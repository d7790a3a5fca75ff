"""A scaled-down `benchmarks/bench_step.py`: the JSON line it prints, and sane ratios (never absolute times)."""

import importlib.util
import json
import math
from pathlib import Path


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"
KEYS = {"baseline_s", "tuna_s", "speedup", "baseline_peak_mb", "tuna_peak_mb", "memory_ratio", "ideal_speedup"}


def test_bench_step_prints_one_json_line(capsys):
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    small = ["--examples", "3", "--completions", "3", "--layers", "1", "--hidden", "64", "--vocab", "4000",
             "--length-scale", "0.25", "--reps", "1"]  # fmt: skip
    bench.main(small)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert KEYS <= result.keys()
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in KEYS)
    assert result["speedup"] == result["baseline_s"] / result["tuna_s"] or math.isclose(
        result["speedup"], result["baseline_s"] / result["tuna_s"], rel_tol=1e-2
    )
    assert result["tuna_layout"] == "prefix-shared"
    assert result["ideal_speedup"] > 1  # 3 completions share each prompt
    assert result["unique_tokens"] <= result["tuna_tokens"] < result["padded_tokens"]
    assert result["loss_abs_diff"] < 1e-3  # both variants compute the same loss
    # memory: the baseline holds (rows x length x vocabulary) float32 log-probs, tuna-trl does not
    assert 0 < result["memory_ratio"] < 1
