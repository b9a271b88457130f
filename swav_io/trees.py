"""Nested option dicts (storage options, DeepSpeed configs) layered one over another."""

from __future__ import annotations


def deep_merge(*layers: dict | None) -> dict:
    """Later layers win key by key; a dict over a dict merges, anything else replaces. Inputs are not changed."""
    out: dict = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
