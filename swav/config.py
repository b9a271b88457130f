"""Typed run configuration: dataclasses loaded from YAML, overridden by dotted ``key=value`` (OmegaConf).

Every knob a run uses is here, so one file (plus overrides) says everything about
a run, and the resolved version is saved beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from swav_io.errors import UserError
from swav_io.storage import redact


def knob(default: Any, doc: str, *, trains: bool = True) -> Any:
    """A config field with its documentation; `trains=False` marks a setting that does not change what is
    trained or in which order (where files go, how fast, how often we look): a resume may change it freely."""
    meta = {"doc": doc, "trains": trains}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str, *, trains: bool = True) -> Any:
    return field(default_factory=cls, metadata={"doc": doc, "trains": trains})


@dataclass
class DataConfig:
    url: str = knob("", "shard set URL (any fsspec URL)")
    storage_options: dict = knob({}, "fsspec options for the shard set; secrets are never saved", trains=False)
    num_workers: int = knob(2, "DataLoader worker processes per rank", trains=False)
    shuffle_window: int = knob(16, "sample-level shuffle window: pieces (whole shards, or ranges of one when the set "
                               "has fewer shards than readers x window) open at once per reader (rank x worker); a "
                               "batch of B spans about min(B, W) of them. Its cost does not grow with the set")
    restart_pass: bool = knob(False, "on resume, start a fresh pass over the set as it is now instead of finishing "
                              "the saved one: for a set whose shards were removed or rebuilt since the checkpoint")
    cache_dir: str = knob("", "local copy of remote shards (\"\" = stream without caching)", trains=False)
    cache_max_bytes: int = knob(10 * 1024**3, "size limit of cache_dir, least recently used shards go first",
                                trains=False)
    prefetch_factor: int = knob(2, "batches each DataLoader worker prepares ahead", trains=False)
    max_pixels: int = knob(100_000_000, "images whose header claims more pixels are skipped and counted before "
                           "decoding: one decompression bomb in a foreign shard must not take a worker's memory")


@dataclass
class CropsConfig:
    size_crops: list[int] = knob([224, 96], "output side of each crop group, in pixels")
    num_crops: list[int] = knob([2, 6], "crops per group")
    min_scale_crops: list[float] = knob([0.14, 0.05], "smallest area fraction of a random resized crop, per group")
    max_scale_crops: list[float] = knob([1.0, 0.14], "largest area fraction of a random resized crop, per group")
    augment_on: str = knob("cpu", "cpu | device: where colour jitter, blur, flips and normalisation run")
    flip_prob: float = knob(0.5, "horizontal flip probability; 0 for data whose meaning is not mirror-symmetric")
    blur_prob: float = knob(0.5, "Gaussian blur probability")
    blur_sigma: list[float] = knob([0.1, 2.0], "blur sigma range [low, high], in pixels of the output crop")


@dataclass
class ModelConfig:
    arch: str = knob("resnet50", "resnet50, resnet50w2/w4/w5, or a width like resnet50w0.25")
    hidden_mlp: int = knob(0, "projection head hidden width (0 = the reference's choice for the arch)")
    feat_dim: int = knob(128, "projection output dimension")
    num_prototypes: Any = knob(3000, "prototypes: an integer, or a list of integers for several heads")
    sync_bn: bool = knob(True, "SyncBatchNorm on GPU (plain BatchNorm on CPU, with a warning)")
    sync_bn_group_size: int = knob(0, "ranks per SyncBatchNorm group (0 = all ranks)")
    channels_last: bool = knob(True, "NHWC inputs (and ZeRO-0 weights on GPU)")


@dataclass
class SwAVConfig:
    crops_for_assign: list[int] = knob([0, 1], "crops whose codes are computed (indices into all crops)")
    temperature: float = knob(0.1, "softmax temperature of the swapped prediction")
    epsilon: float = knob(0.05, "Sinkhorn entropy regularisation")
    sinkhorn_iterations: int = knob(3, "Sinkhorn-Knopp iterations")
    queue_length: int = knob(0, "global queue length (rounded down to a multiple of the global batch; 0 = none)")
    queue_start_step: int = knob(0, "step from which the queue is used")
    freeze_prototypes_steps: int = knob(313, "steps during which the prototypes get no gradient")


@dataclass
class ObjectiveConfig:
    name: str = knob("swav", "swav | deepclusterv2 | selav2: what a step learns from the crops' embeddings "
                     "(docs/objectives.md)")
    bank_size: int = knob(4096, "deepclusterv2, selav2: memory bank rows per rank, the newest embeddings of the "
                          "assignment crops keyed by sample id; the memory bound, whatever the set's size")
    period: int = knob(100, "deepclusterv2, selav2: steps between clusterings of the banks (k-means across ranks, "
                       "or Sinkhorn equipartition over the banks); the first is at this step")
    kmeans_iterations: int = knob(10, "deepclusterv2: Lloyd iterations of each clustering")
    bank_sinkhorn_iterations: int = knob(50, "selav2: Sinkhorn-Knopp iterations over the bank before rounding")


@dataclass
class OptimConfig:
    name: str = knob("lars", "lars | sgd | adamw")
    base_lr: float = knob(4.8, "learning rate after warmup")
    final_lr: float = knob(0.0048, "learning rate at the last step (cosine decay)")
    start_warmup: float = knob(0.0, "learning rate at step 0 (linear warmup)")
    warmup_steps: int = knob(0, "linear warmup steps")
    momentum: float = knob(0.9, "momentum (beta1 for adamw)")
    weight_decay: float = knob(1e-6, "weight decay")
    trust_coefficient: float = knob(0.001, "LARS trust coefficient")
    clip: bool = knob(False, "LARS: clip the adaptive rate at 1 (LARC clip mode)")
    exclude_bias_and_bn: bool = knob(False, "no weight decay and no LARS adaptation on biases and BatchNorm")


@dataclass
class TrainConfig:
    steps: int = knob(1000, "training steps")
    batch_size: int = knob(64, "images per rank per step")
    log_every: int = knob(10, "steps between log lines and metrics records", trains=False)
    stop_after: int = knob(0, "end the process after this step as if preempted (0 = never)", trains=False)
    sync_every: int = knob(10, "ranks agree on preemption and check the loss every N steps (and at log and "
                           "checkpoint steps); no host sync on the other steps", trains=False)


@dataclass
class CheckpointConfig:
    url: str = knob("", "where checkpoints go, any fsspec URL (\"\" = <run_dir>/checkpoints)")
    every: int = knob(500, "steps between checkpoints")
    keep: int = knob(2, "published checkpoints kept; older ones are pruned")
    storage_options: dict = knob({}, "fsspec options for the checkpoint store; secrets are never saved")
    stage_dir: str = knob("", "local staging, in a sub-folder per job (\"\" = the temp dir)")
    max_failures: int = knob(3, "failed periodic saves in a row that stop the run (a single one is logged)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = knob(0, "ZeRO stage 0-3")
    gradient_clipping: float = knob(0.0, "DeepSpeed gradient clipping (0 = off)")
    extra: dict = knob({}, "merged into the generated DeepSpeed config")


@dataclass
class Config:
    seed: int = knob(31, "seed of the data order, crops and initialisation")
    run_dir: str = knob("runs/default", "where the resolved config, logs and metrics go", trains=False)
    precision: str = knob("fp32", "fp32 | bf16 (torch autocast; the prototypes stay fp32)")
    resume_from: str = knob("", "a checkpoint URL (\"\" = continue from <checkpoint.url>/latest if any)",
                            trains=False)
    data: DataConfig = section(DataConfig, "the shard set and how it is read")
    crops: CropsConfig = section(CropsConfig, "multi-crop views")
    model: ModelConfig = section(ModelConfig, "trunk, projection head and prototypes")
    swav: SwAVConfig = section(SwAVConfig, "crops for assignment, temperature, Sinkhorn, queue, prototype freeze "
                               "(temperature, crops_for_assign and the freeze apply to every objective)")
    objective: ObjectiveConfig = section(ObjectiveConfig, "the clustering objective and its memory bank")
    optim: OptimConfig = section(OptimConfig, "optimizer and learning-rate schedule")
    train: TrainConfig = section(TrainConfig, "steps, batch, logging")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "where and how often state is saved", trains=False)
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "ZeRO and DeepSpeed settings", trains=False)


RENAMED = {"mix_shards": "shuffle_window"}
_KINDS = {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}


def _hint(path: list[str]) -> Any:
    """The declared type at a dotted path ('crops.size_crops[1]' is the list's item type)."""
    tp: Any = Config
    for part in path:
        name = part.split("[", 1)[0]
        tp = typing.get_type_hints(tp)[name]
        if "[" in part:
            (tp,) = typing.get_args(tp)
    return tp


def _check_keys(obj: type, values: dict, prefix: str = "") -> dict:
    """Our messages for what OmegaConf would report less plainly: renamed, unknown and section keys.
    A null dict becomes {} (YAML writes an empty mapping as nothing)."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(obj)
    out = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k in RENAMED and RENAMED[k] in fields:
            raise UserError(f"config key '{key}' is now '{prefix}{RENAMED[k]}'")
        if k not in fields:
            raise UserError(f"unknown config key '{key}' (known here: {', '.join(sorted(fields))})")
        if dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise UserError(f"config key '{key}' is a section; give '{key}.<name>=...'")
            v = _check_keys(hints[k], v, f"{key}.")
        elif hints[k] is dict and v is None:
            v = {}
        out[k] = v
    return out


def _merge(schema: Any, values: dict, where: str) -> Any:
    try:
        return OmegaConf.merge(schema, _check_keys(Config, values))
    except OmegaConfBaseException as e:
        key = e.full_key or "?"
        kind = _KINDS.get(_hint(re.split(r"\.(?![^\[]*\])", key)) if e.full_key else None, "another type")
        raise UserError(f"config key '{key}' expects {kind}, got {e.value!r} ({where})") from None


def load_config(path: str | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults, then ``base``, then the YAML file, then overrides; each layer type-checked (OmegaConf)."""
    schema = OmegaConf.structured(Config)
    if base:
        schema = _merge(schema, base, "built-in defaults")
    if path:
        schema = _merge(schema, read_mapping(path, "config file"), path)
    for text in overrides or []:
        keys, value = parse_override(text)
        schema = _merge(schema, nest(keys, value), f"override {text!r}")
    try:
        cfg = OmegaConf.to_object(schema)
    except OmegaConfBaseException as e:  # an interpolation that does not resolve
        raise UserError(f"config key '{e.full_key}': {str(e).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def read_mapping(path: str, what: str) -> dict:
    """A YAML file that must hold a mapping (empty: {}); a missing or malformed one is a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping")
    return data


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


def validate(cfg: Config) -> None:
    """Checks across fields, and ranges, that the types alone do not express."""
    p = cfg.model.num_prototypes
    heads = p if isinstance(p, list) else [p]
    if not heads or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in heads):
        raise UserError(f"config key 'model.num_prototypes' expects a positive integer or a list of them, got {p!r}")
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
    o = cfg.objective
    if o.name not in ("swav", "deepclusterv2", "selav2"):
        raise UserError(f"objective.name must be swav, deepclusterv2 or selav2, got {o.name!r}")
    for name in ("bank_size", "period", "kmeans_iterations", "bank_sinkhorn_iterations"):
        if getattr(o, name) < 1:
            raise UserError(f"objective.{name} must be >= 1, got {getattr(o, name)}")
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
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)
