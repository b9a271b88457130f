"""What changed between the config a checkpoint was saved with and the one resuming it."""

from __future__ import annotations

import yaml

# Settings that do not change what is trained or in which order: where things go, how fast, how often
# we look. Everything else (schedule, recipe, the data and its order, model) is named when it differs on resume.
_INERT = ("run_dir", "resume_from", "checkpoint.", "data.storage_options", "data.num_workers",
          "data.prefetch_factor", "data.cache_dir", "data.cache_max_bytes", "train.log_every", "train.sync_every",
          "train.stop_after", "deepspeed.")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def schedule_changes(saved_yaml: str, now: dict) -> list[str]:
    """'key: saved -> now' for every setting that differs and shapes the training."""
    saved = _flat(yaml.safe_load(saved_yaml) or {})
    current = _flat(now)
    lines = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith(_INERT):
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, tuple):
            a = list(a)
        if isinstance(b, tuple):
            b = list(b)
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines
