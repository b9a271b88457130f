"""Typed run configuration: dataclasses loaded from YAML, overridden by dotted ``key=value``.

Every knob a run uses is here, so one file (plus overrides) says everything about
a run, and the resolved version is saved beside it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

from swav_io.errors import UserError


@dataclass
class DataConfig:
    url: str = ""                       # shard set URL (any fsspec URL)
    storage_options: dict = field(default_factory=dict)  # fsspec options; secrets are never saved
    num_workers: int = 2                # DataLoader worker processes per rank
    # The sample-level shuffle window, in pieces (whole shards, or ranges of one when the set has fewer
    # shards than readers x window) open at once per consumer (rank x worker): each sample is drawn from
    # one of them at random, so a batch of B spans ~min(B, W) of them. Independent of the set's size:
    # 16 open pieces cost 16 file handles and reader buffers, at 1e3 or 1e9 images.
    shuffle_window: int = 16
    # On resume, start a fresh pass over the set as it is now instead of finishing the saved one: for a
    # set whose shards were removed or rebuilt since the checkpoint (added shards need nothing).
    restart_pass: bool = False
    cache_dir: str = ""                 # local copy of remote shards ("" = stream without caching)
    cache_max_bytes: int = 10 * 1024**3
    prefetch_factor: int = 2
    # Images whose header claims more pixels are skipped (and counted) before decoding: shards other
    # tools wrote may hold anything, and one decompression bomb must not take a worker's memory.
    max_pixels: int = 100_000_000


@dataclass
class CropsConfig:
    size_crops: list[int] = field(default_factory=lambda: [224, 96])
    num_crops: list[int] = field(default_factory=lambda: [2, 6])
    min_scale_crops: list[float] = field(default_factory=lambda: [0.14, 0.05])
    max_scale_crops: list[float] = field(default_factory=lambda: [1.0, 0.14])
    augment_on: str = "cpu"             # cpu | device: where colour jitter, blur, flips and normalisation run
    flip_prob: float = 0.5              # horizontal flips; 0 for data whose meaning is not mirror-symmetric (text, digits)
    blur_prob: float = 0.5              # Gaussian blur, sigma uniform in blur_sigma (pixels of the output crop)
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])


@dataclass
class ModelConfig:
    arch: str = "resnet50"              # resnet50, resnet50w2/w4/w5, or resnet50w0.25 style widths
    hidden_mlp: int = 0                 # 0 = the reference's choice for the arch
    feat_dim: int = 128
    num_prototypes: Union[int, list[int]] = 3000
    sync_bn: bool = True                # SyncBatchNorm on GPU (plain BatchNorm on CPU, with a warning)
    sync_bn_group_size: int = 0         # ranks per SyncBN group (0 = all ranks)
    channels_last: bool = True          # NHWC inputs (and ZeRO-0 weights on GPU)


@dataclass
class SwAVConfig:
    crops_for_assign: list[int] = field(default_factory=lambda: [0, 1])
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    queue_length: int = 0               # global queue length (rounded down to a multiple of global batch)
    queue_start_step: int = 0
    freeze_prototypes_steps: int = 313


@dataclass
class OptimConfig:
    name: str = "lars"                  # lars | sgd | adamw
    base_lr: float = 4.8
    final_lr: float = 0.0048
    start_warmup: float = 0.0
    warmup_steps: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    trust_coefficient: float = 0.001
    clip: bool = False
    exclude_bias_and_bn: bool = False


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64                # per rank
    log_every: int = 10
    stop_after: int = 0                 # end the process after this step as if preempted (0 = never)
    sync_every: int = 10                # ranks agree on preemption and check the loss every N steps (and at
                                        # log and checkpoint steps): no host sync on the other steps


@dataclass
class CheckpointConfig:
    url: str = ""                       # "" = <run_dir>/checkpoints
    every: int = 500
    keep: int = 2
    storage_options: dict = field(default_factory=dict)
    stage_dir: str = ""                 # local staging, in a sub-folder per job ("" = the temp dir)
    # A periodic save whose upload fails is logged and skipped; this many failures in a row stop the run.
    max_failures: int = 3


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    gradient_clipping: float = 0.0
    extra: dict = field(default_factory=dict)   # merged into the generated DeepSpeed config


@dataclass
class Config:
    seed: int = 31
    run_dir: str = "runs/default"
    precision: str = "fp32"             # fp32 | bf16
    resume_from: str = ""               # a checkpoint URL; "" = continue from <checkpoint.url>/latest if any
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except UserError:
                continue
        raise UserError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}' expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}' expects a string, got {value!r}")
    raise UserError(f"config key '{key}' has an unsupported type {tp}")


RENAMED = {"mix_shards": "shuffle_window"}


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k in RENAMED and RENAMED[k] in names:
            raise UserError(f"config key '{key}' is now '{prefix}{RENAMED[k]}'")
        if k not in names:
            raise UserError(f"unknown config key '{key}' (known here: {', '.join(sorted(names))})")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise UserError(f"config key '{key}' is a section; give '{key}.<name>=...'")
            _apply(current, v, f"{key}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def nest(path: list[str], value: Any) -> dict:
    out: dict = {}
    cur = out
    for p in path[:-1]:
        cur = cur.setdefault(p, {})
    cur[path[-1]] = value
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults, then ``base``, then the YAML file, then overrides; each layer type-checked."""
    cfg = Config()
    if base:
        _apply(cfg, base)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping")
        _apply(cfg, data)
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply(cfg, nest(keys, value))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    c = cfg.crops
    if not (len(c.size_crops) == len(c.num_crops) == len(c.min_scale_crops) == len(c.max_scale_crops)):
        raise UserError("crops.size_crops, num_crops, min_scale_crops and max_scale_crops must have equal lengths")
    total = sum(c.num_crops)
    if any(not 0 <= i < total for i in cfg.swav.crops_for_assign):
        raise UserError(f"swav.crops_for_assign must index the {total} crops")
    if c.augment_on not in ("cpu", "device"):
        raise UserError("crops.augment_on must be 'cpu' or 'device'")
    for name in ("flip_prob", "blur_prob"):
        if not 0.0 <= getattr(c, name) <= 1.0:
            raise UserError(f"crops.{name} must be between 0 and 1, got {getattr(c, name)}")
    if len(c.blur_sigma) != 2 or not 0.0 < c.blur_sigma[0] <= c.blur_sigma[1]:
        raise UserError(f"crops.blur_sigma must be [low, high] with 0 < low <= high, got {c.blur_sigma}")
    if cfg.precision not in ("fp32", "bf16"):
        raise UserError("precision must be 'fp32' or 'bf16'")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise UserError("deepspeed.zero_stage must be 0, 1, 2 or 3")
    if cfg.optim.name not in ("lars", "sgd", "adamw"):
        raise UserError("optim.name must be lars, sgd or adamw")
    if cfg.data.shuffle_window < 1:
        raise UserError("data.shuffle_window must be >= 1 (shards open per reader)")
    if cfg.train.batch_size < 1 or cfg.train.steps < 1:
        raise UserError("train.batch_size and train.steps must be >= 1")
    if cfg.checkpoint.keep < 1:
        raise UserError("checkpoint.keep must be >= 1")
    # Settings that would crash mid-run (a modulo by zero) or silently train something else.
    for name, value in (("checkpoint.every", cfg.checkpoint.every), ("train.log_every", cfg.train.log_every),
                        ("train.sync_every", cfg.train.sync_every), ("data.max_pixels", cfg.data.max_pixels),
                        ("checkpoint.max_failures", cfg.checkpoint.max_failures)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    for name, value in (("swav.epsilon", cfg.swav.epsilon), ("swav.temperature", cfg.swav.temperature)):
        if not value > 0:
            raise UserError(f"{name} must be > 0, got {value}")
    extra = cfg.deepspeed.extra or {}
    if extra.get("gradient_accumulation_steps", 1) != 1:
        raise UserError("deepspeed.extra.gradient_accumulation_steps is not supported: SwAV's Sinkhorn and queue "
                        "work per step on the whole global batch; raise train.batch_size or the GPU count instead")
    if (extra.get("bf16") or {}).get("enabled"):
        raise UserError("deepspeed.extra.bf16.enabled breaks BatchNorm here; set precision: bf16 instead "
                        "(torch autocast, with the prototypes kept in fp32)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    from swav_io.storage import redact

    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)
