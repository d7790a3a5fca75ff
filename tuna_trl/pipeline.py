"""`tuna-trl pipeline`: the whole Tuna recipe from one YAML config, stage by stage, resumable.

    sft -> probabilistic -> tuna_p -> contextual -> tuna          (variant "tuna", the paper's main model)

Each stage writes into `<output_dir>/<stage>/` and records what it produced in `<stage>/manifest.json`. A rerun
skips the stages whose manifest says `done` with the same settings and inputs, and resumes an interrupted one
(training from its last Trainer checkpoint, generation from the rows already written). The stage kinds live in
`pipeline_stages.py`; this module reads the config, wires the stages together and keeps the manifests.

Variants (`variant:` in the config) choose the stages and how they are wired:

| variant   | stages (kind)                                                                           |
|-----------|------------------------------------------------------------------------------------------|
| `sft`     | sft (the baseline alone)                                                                 |
| `tuna`    | sft, probabilistic, tuna_p (sft + probabilistic), contextual (on tuna_p), tuna (tuna_p + contextual) |
| `tuna_p`  | sft, probabilistic, tuna_p                                                               |
| `tuna_c`  | sft, contextual (on sft), tuna_c (sft + contextual)                                      |
| `tuna_cp` | sft, contextual (on sft), tuna_c, probabilistic, tuna_cp (tuna_c + probabilistic)        |
| `mix`     | sft, probabilistic, contextual (on sft), tuna_mix (sft + both data sets)                 |

See docs/pipeline.md for every config key.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


logger = logging.getLogger("tuna_trl.pipeline")

MANIFEST = "manifest.json"

# stage name -> (kind, default settings); defaults wire each stage to the ones before it
_STAGE_DEFAULTS: dict[str, tuple[str, dict]] = {
    "sft": ("sft", {}),
    "probabilistic": ("probabilistic", {}),
    "tuna_p": ("train", {"init": "sft", "data": ["probabilistic"]}),
    "contextual": ("contextual", {"policy": "tuna_p"}),
    # Sec. 3: the second stage continues from Tuna_p with a 10x smaller learning rate
    "tuna": ("train", {"init": "tuna_p", "data": ["contextual"], "training": {"learning_rate": 1e-6}}),
    "tuna_c": ("train", {"init": "sft", "data": ["contextual"]}),
    "tuna_cp": ("train", {"init": "tuna_c", "data": ["probabilistic"]}),
    "tuna_mix": ("train", {"init": "sft", "data": ["probabilistic", "contextual"]}),
}

VARIANTS: dict[str, list[str]] = {
    "sft": ["sft"],
    "tuna": ["sft", "probabilistic", "tuna_p", "contextual", "tuna"],
    "tuna_p": ["sft", "probabilistic", "tuna_p"],
    "tuna_c": ["sft", "contextual", "tuna_c"],
    "tuna_cp": ["sft", "contextual", "tuna_c", "probabilistic", "tuna_cp"],
    "mix": ["sft", "probabilistic", "contextual", "tuna_mix"],
}
# where the variant's contextual stage samples from, when the config does not say
_CONTEXTUAL_POLICY = {"tuna": "tuna_p", "tuna_c": "sft", "tuna_cp": "sft", "mix": "sft"}

_TOP_LEVEL_KEYS = {"output_dir", "variant", "model", "data", "training", "seed", "stages"}
_DATA_KEYS = {"path", "dataset", "split", "prompt_template", "limit"}
_STAGE_KEYS = {
    "sft": {"model", "data", "training", "keep_checkpoints"},
    "train": {"init", "data", "training", "keep_checkpoints"},
    "probabilistic": {
        "teacher", "data", "n", "temperature", "beta", "max_new_tokens", "limit", "max_error_fraction",
        "price_per_1k_tokens", "completion_price_per_1k_tokens", "seed",
    },
    "contextual": {
        "policy", "judge", "data", "n", "temperature", "tau", "temperature_step", "max_trials", "max_new_tokens",
        "limit", "max_error_fraction", "judge_workers", "price_per_1k_tokens", "completion_price_per_1k_tokens", "seed",
    },
}
# settings that change how fast a stage runs, not what it produces: changing them never invalidates a stage
_OPERATIONAL_KEYS = {
    "batch_size", "concurrency", "timeout", "max_retries", "backoff_initial", "backoff_max", "api_key_env", "device",
    "judge_workers", "keep_checkpoints", "price_per_1k_tokens", "completion_price_per_1k_tokens",
    "logging_steps", "logging_first_step", "save_strategy", "save_steps", "save_total_limit", "report_to",
    "disable_tqdm", "dataloader_num_workers", "dataset_num_proc", "run_name", "logging_dir", "max_error_fraction",
}


class PipelineError(ValueError):
    """A config or state problem the user can fix; the message says what and where."""


# ----------------------------------------------------------------------------------------------------------------------
# Config


def yaml_load(stream):
    """`yaml.safe_load`, except that `1e-5` is a float (YAML 1.1, and so PyYAML, wants `1.0e-5`): learning rates
    are written both ways."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                   r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."),
    )
    return yaml.load(stream, Loader=Loader)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Read a pipeline YAML file and apply `--set key.sub=value` overrides (values are parsed as YAML)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml_load(f) or {}
    except FileNotFoundError:
        raise PipelineError(f"Pipeline config {path} does not exist.") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise PipelineError(f"{path}: the config must be a YAML mapping, got {type(config).__name__}.")
    for override in overrides or []:
        apply_override(config, override)
    return config


def apply_override(config: dict, override: str) -> None:
    """Set `a.b.c=value` in `config` in place; `value` is parsed as YAML (`1e-6` is a float, `[a, b]` a list)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise PipelineError(f"--set {override!r}: expected KEY=VALUE, e.g. stages.tuna.training.learning_rate=1e-6")
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PipelineError(f"--set {override!r}: {part!r} is not a mapping in the config.")
    node[parts[-1]] = yaml_load(value)


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Stage:
    """One resolved stage: its `name`, `kind` (sft, probabilistic, contextual, train), merged `settings` and
    `dir`. `needs` are the names of the stages whose outputs it reads."""

    name: str
    kind: str
    settings: dict
    dir: Path
    needs: list[str] = field(default_factory=list)

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST


def resolve_stages(config: dict) -> list[Stage]:
    """Validate `config` and return its stages in run order, each with its settings merged from the defaults, the
    top-level `training` (training stages) and `stages.<name>`."""
    unknown = set(config) - _TOP_LEVEL_KEYS
    if unknown:
        raise PipelineError(f"Unknown top-level config key(s) {sorted(unknown)}; expected {sorted(_TOP_LEVEL_KEYS)}.")
    if not config.get("output_dir"):
        raise PipelineError("The config needs `output_dir`, the directory every stage writes into.")
    variant = config.get("variant", "tuna")
    if variant not in VARIANTS:
        raise PipelineError(f"Unknown variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    data = config.get("data") or {}
    if set(data) - _DATA_KEYS:
        raise PipelineError(f"Unknown `data` key(s) {sorted(set(data) - _DATA_KEYS)}; expected {sorted(_DATA_KEYS)}.")
    names = VARIANTS[variant]
    stage_configs = config.get("stages") or {}
    unknown = set(stage_configs) - set(_STAGE_DEFAULTS)
    if unknown:
        raise PipelineError(f"`stages` configures unknown stage(s) {sorted(unknown)}; stages are {list(_STAGE_DEFAULTS)}.")
    unused = sorted(set(stage_configs) - set(names))
    if unused:  # one config serves every variant: switching `variant` must not need other edits
        logger.info("variant %s does not run %s; their settings are not used", variant, ", ".join(unused))
    output_dir = Path(config["output_dir"])
    stages = []
    for name in names:
        kind, defaults = _STAGE_DEFAULTS[name]
        defaults = copy.deepcopy(defaults)
        if name == "contextual":
            defaults["policy"] = _CONTEXTUAL_POLICY[variant]
        if kind in ("sft", "train"):
            defaults["training"] = _deep_merge(config.get("training") or {}, defaults.get("training") or {})
        own = stage_configs.get(name) or {}
        if not isinstance(own, dict):
            raise PipelineError(f"stages.{name} must be a mapping, got {type(own).__name__}.")
        bad = set(own) - _STAGE_KEYS[kind]
        if bad:
            raise PipelineError(f"Unknown key(s) {sorted(bad)} in stages.{name}; a {kind} stage takes {sorted(_STAGE_KEYS[kind])}.")
        settings = _deep_merge(defaults, own)
        if kind == "contextual" and isinstance(settings.get("policy"), dict) and not settings["policy"].get("model"):
            settings["policy"]["model"] = _CONTEXTUAL_POLICY[variant]  # e.g. {batch_size: 64}: the variant's model
        if kind == "sft":
            settings.setdefault("model", config.get("model"))
            if not settings["model"]:
                raise PipelineError("The sft stage needs a base model: set `model` (a Hub id or a local directory).")
        if kind in ("sft", "probabilistic", "contextual"):
            settings["data"] = _deep_merge(data, settings.get("data") or {}) if not isinstance(settings.get("data"), str) else {"path": settings["data"]}
            if not (settings["data"].get("path") or settings["data"].get("dataset")):
                raise PipelineError(f"Stage {name} needs instructions: set `data.path` (Alpaca JSON/JSONL) or `data.dataset`.")
        if kind in ("sft", "train"):
            settings["training"].setdefault("seed", config.get("seed", 42))
        else:
            settings.setdefault("seed", config.get("seed", 42))
        if kind == "train" and isinstance(settings.get("data"), str):
            settings["data"] = [settings["data"]]
        needs = _references(kind, settings, names)
        for needed in needs:
            if names.index(needed) >= names.index(name):
                raise PipelineError(f"Stage {name} reads stage {needed!r}, which runs after it in variant {variant!r}.")
        stages.append(Stage(name, kind, settings, output_dir / name, needs))
    return stages


def _references(kind: str, settings: dict, names: list[str]) -> list[str]:
    """The stage names among the settings that point at other stages' outputs (anything else is a path)."""
    refs = []
    if kind == "train":
        refs += [settings.get("init")] + list(settings.get("data") or [])
    elif kind == "contextual":
        policy = settings.get("policy")
        refs.append(policy.get("model") if isinstance(policy, dict) else policy)
        judge = settings.get("judge") or {}
        refs.append(judge.get("path") if judge.get("type") == "prm" else judge.get("model"))
    return [r for r in refs if isinstance(r, str) and r in names]


# ----------------------------------------------------------------------------------------------------------------------
# Manifests


def read_manifest(stage: Stage) -> dict | None:
    try:
        with open(stage.manifest_path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _is_main_process() -> bool:
    # under `accelerate launch` / torchrun every process runs the stage; only the first one keeps the books
    return int(os.environ.get("RANK", "0")) == 0


def write_manifest(stage: Stage, manifest: dict) -> None:
    """Write atomically, so that a crash never leaves a half-written manifest (main process only)."""
    if not _is_main_process():
        return
    stage.dir.mkdir(parents=True, exist_ok=True)
    tmp = stage.manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, stage.manifest_path)


def _fingerprinted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _fingerprinted(v) for k, v in sorted(value.items()) if k not in _OPERATIONAL_KEYS}
    if isinstance(value, list):
        return [_fingerprinted(v) for v in value]
    return value


def stage_identity(stage: Stage, upstream: dict[str, dict]) -> dict:
    """What a stage's result depends on: its settings (less the operational ones) and the run ids of the stages
    it reads, so that redoing an upstream stage invalidates everything built on it."""
    return {
        "kind": stage.kind,
        "settings": _fingerprinted(stage.settings),
        "inputs": {name: upstream[name]["run_id"] for name in stage.needs},
    }


def _fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


# ----------------------------------------------------------------------------------------------------------------------
# Running


class Pipeline:
    """The stages of a config and their state on disk.

    >>> pipeline = Pipeline(load_config("pipeline.yaml"))   # doctest: +SKIP
    >>> pipeline.run()                                      # doctest: +SKIP
    """

    def __init__(self, config: dict):
        self.config = config
        self.stages = resolve_stages(config)
        self.by_name = {stage.name: stage for stage in self.stages}
        self.output_dir = Path(config["output_dir"])

    def output_of(self, name: str, what: str) -> str:
        """The absolute path of output `what` ("model" or "data") of finished stage `name`."""
        stage = self.by_name[name]
        manifest = read_manifest(stage)
        if not manifest or manifest.get("status") != "done":
            raise PipelineError(
                f"Stage {name!r} has not finished (no done manifest in {stage.dir}); run it first, e.g. "
                f"`tuna-trl pipeline --config CONFIG --stage {name}`."
            )
        if what not in manifest["outputs"]:
            raise PipelineError(f"Stage {name!r} produced {sorted(manifest['outputs'])}, not a {what}.")
        return str(stage.dir / manifest["outputs"][what])

    def status(self) -> list[dict]:
        """One entry per stage: `name`, `kind`, `status` (done, running, missing) and `dir`."""
        rows = []
        for stage in self.stages:
            manifest = read_manifest(stage) or {}
            rows.append({"name": stage.name, "kind": stage.kind, "status": manifest.get("status", "missing"), "dir": str(stage.dir)})
        return rows

    def _dependents(self, names: set[str]) -> set[str]:
        out = set(names)
        for stage in self.stages:  # run order: a dependent always comes after what it depends on
            if out & set(stage.needs):
                out.add(stage.name)
        return out

    def run(
        self, only: list[str] | None = None, redo: list[str] | None = None, progress: bool = True, redo_changed: bool = False
    ) -> dict[str, dict]:
        """Run the stages in order (only those in `only`, when given), skipping finished ones.

        Args:
            only: stage names to run; the stages they read must be done already.
            redo: stage names to run from scratch (their directory is deleted first), with every stage that reads
                them, transitively.
            redo_changed: run from scratch the stages whose settings or inputs changed since they ran (and so
                every stage that reads them), instead of stopping with an error.
        Returns:
            `{stage name: manifest}` of the stages considered.
        """
        for name in [*(only or []), *(redo or [])]:
            if name not in self.by_name:
                raise PipelineError(f"Unknown stage {name!r}; this config's stages are {list(self.by_name)}.")
        redo_all = self._dependents(set(redo or []))
        selected = [s for s in self.stages if only is None or s.name in only]
        manifests: dict[str, dict] = {}
        for index, stage in enumerate(self.stages):
            if stage not in selected:
                manifest = read_manifest(stage)
                if manifest is not None:
                    manifests[stage.name] = manifest
                continue
            missing = [n for n in stage.needs if manifests.get(n, {}).get("status") != "done"]
            if missing:
                raise PipelineError(
                    f"Stage {stage.name!r} reads {missing}, which have not finished in {self.output_dir}. Run them "
                    f"first (`tuna-trl pipeline --config CONFIG`), or point stage {stage.name!r} at existing outputs."
                )
            position = f"[{index + 1}/{len(self.stages)}] {stage.name}"
            if stage.name in redo_all and stage.dir.exists() and _is_main_process():
                logger.info("%s: redoing from scratch, deleting %s", position, stage.dir)
                shutil.rmtree(stage.dir)
            manifests[stage.name] = self._run_stage(stage, manifests, position, progress, redo_changed)
        return manifests

    def _run_stage(self, stage: Stage, upstream: dict[str, dict], position: str, progress: bool, redo_changed: bool) -> dict:
        from . import pipeline_stages

        identity = stage_identity(stage, upstream)
        fingerprint = _fingerprint(identity)
        previous = read_manifest(stage)
        if previous is not None and previous.get("fingerprint") != fingerprint:
            changes = _differences(previous.get("identity", {}), identity)
            if redo_changed:
                logger.info("%s: settings or inputs changed (%s); redoing from scratch", position, "; ".join(changes[:5]))
                if _is_main_process():
                    shutil.rmtree(stage.dir)
                previous = None
        if previous is not None and previous.get("fingerprint") != fingerprint:
            raise PipelineError(
                f"Stage {stage.name!r} in {stage.dir} was {'finished' if previous.get('status') == 'done' else 'started'} "
                f"with other settings or inputs ({'; '.join(changes[:5]) or 'unknown changes'}). Pass "
                f"`--redo {stage.name}` to run it again from scratch (stages that read it are redone too), "
                "`--redo-changed` to redo whatever changed, or restore the settings."
            )
        if previous is not None and previous.get("status") == "done":
            logger.info("%s: done already, skipped (%s)", position, ", ".join(f"{k}: {stage.dir / v}" for k, v in previous["outputs"].items()))
            return previous
        resuming = previous is not None
        manifest = {
            "stage": stage.name,
            "kind": stage.kind,
            "status": "running",
            "fingerprint": fingerprint,
            "identity": identity,
            "settings": stage.settings,
            "inputs": {name: upstream[name]["outputs"] for name in stage.needs},
            "started": previous["started"] if resuming else time.strftime("%Y-%m-%dT%H:%M:%S"),
            "attempts": (previous.get("attempts", 1) + 1) if resuming else 1,
        }
        write_manifest(stage, manifest)
        logger.info("%s: %s%s", position, pipeline_stages.describe(stage, self), " (resuming)" if resuming else "")
        started = time.monotonic()
        result = pipeline_stages.run(stage, self, progress=progress)
        manifest.update(
            status="done",
            run_id=uuid.uuid4().hex,
            outputs=result.outputs,
            metrics=result.metrics,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            seconds=round(time.monotonic() - started, 1) + (previous or {}).get("seconds", 0.0),
        )
        write_manifest(stage, manifest)
        logger.info("%s: done in %.0fs -> %s", position, time.monotonic() - started, stage.dir)
        return manifest


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def add_parser(subparsers) -> None:
    """Register `tuna-trl pipeline` and `tuna-trl stage`."""
    parser = subparsers.add_parser(
        "pipeline",
        help="Run the Tuna pipeline (sft -> probabilistic -> tuna_p -> contextual -> tuna) from a YAML config.",
        description="Run every stage of a pipeline config in order; finished stages are skipped and an "
        "interrupted one resumes. See docs/pipeline.md.",
    )
    _add_common(parser)
    parser.add_argument("--stage", action="append", dest="only", metavar="NAME",
                        help="Run only this stage (repeatable); the stages it reads must be done.")
    parser.add_argument("--status", action="store_true", help="Print each stage's state and exit.")
    parser.set_defaults(func=_run_command)

    parser = subparsers.add_parser(
        "stage",
        help="Run one stage of a pipeline config (the same as `pipeline --stage NAME`).",
        description="Run one stage of a pipeline config; the stages it reads must be done, or point it at "
        "existing outputs in the config (e.g. stages.tuna_p.init: path/to/model).",
    )
    parser.add_argument("name", help="The stage, e.g. sft, probabilistic, tuna_p, contextual, tuna.")
    _add_common(parser)
    parser.set_defaults(func=_run_command, status=False)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="The pipeline YAML file.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="Override a config value, e.g. --set stages.tuna.training.learning_rate=1e-6 (repeatable).")
    parser.add_argument("--redo", action="append", default=[], metavar="NAME",
                        help="Delete this stage's outputs and run it again, with every stage that reads it.")
    parser.add_argument("--redo-changed", action="store_true",
                        help="Redo the stages whose settings or inputs changed since they ran, instead of stopping.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")


def _run_command(args) -> int:
    try:
        pipeline = Pipeline(load_config(args.config, args.overrides))
        if args.status:
            for row in pipeline.status():
                print(f"{row['name']:<14} {row['kind']:<14} {row['status']:<8} {row['dir']}")
            return 0
        only = [args.name] if getattr(args, "name", None) else args.only
        pipeline.run(only=only, redo=args.redo, progress=not args.no_progress, redo_changed=args.redo_changed)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
