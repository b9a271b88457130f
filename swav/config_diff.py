"""What changed between the config a checkpoint was saved with and the one resuming it."""

from __future__ import annotations

import dataclasses

import yaml

from swav.config import Config


def inert_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Keys (a section's as 'name.') whose fields say `trains=False`: a resume may change them freely.
    Everything else (schedule, recipe, the data and its order, model) is named when it differs on resume."""
    out: list[str] = []
    for f in dataclasses.fields(cls):
        is_section = dataclasses.is_dataclass(f.default_factory)
        if not f.metadata.get("trains", True):
            out.append(f"{prefix}{f.name}." if is_section else f"{prefix}{f.name}")
        elif is_section:
            out.extend(inert_keys(f.default_factory, f"{prefix}{f.name}."))
    return tuple(out)


_INERT = inert_keys()


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
