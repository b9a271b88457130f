"""docs/config.md is generated from the config dataclasses and must not go stale."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from swav.config import Config
from swav.config_reference import render

REPO = Path(__file__).resolve().parents[1]


def test_the_committed_reference_is_what_the_dataclasses_generate():
    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == render(), "docs/config.md is stale: run `python -m swav.config_reference > docs/config.md`"


def test_every_key_is_documented_and_listed():
    page = render()
    for section in dataclasses.fields(Config):
        cls = section.default_factory if dataclasses.is_dataclass(section.default_factory) else None
        names = [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)] if cls else [section.name]
        fields = dataclasses.fields(cls) if cls else [section]
        for name, f in zip(names, fields):
            assert f.metadata.get("doc"), f"{name} has no doc"
            assert f"| `{name}` |" in page, name
