"""docs/config.md, generated from the config dataclasses: `python -m swav.config_reference > docs/config.md`."""

from __future__ import annotations

import dataclasses
import json
import typing

from swav.config import Config

HEADER = """# Configuration reference

Generated from the dataclasses in `swav/config.py` by `python -m swav.config_reference > docs/config.md`;
`tests/test_config_reference.py` fails when this page is stale. Set a key in a job YAML, or on the command
line as a dotted override (`swav pretrain JOB train.steps=500 data.url=s3://bucket/set`).

*Resume* says whether changing the key between a checkpoint and its resume changes what is trained
(`swav pretrain` names every such change in a warning) or not (where files go, how fast, how often we look).
"""


def _type_name(tp: typing.Any) -> str:
    if tp is typing.Any:
        return "int or list[int]"
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return f"`{json.dumps(value)}`"


def render() -> str:
    lines = [HEADER]
    hints = typing.get_type_hints(Config)
    scalars = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(f.default_factory)]
    sections = [f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]
    groups = [("Top level", "", Config, scalars, True)]
    groups += [(f"`{s.name}`: {s.metadata['doc']}", f"{s.name}.", hints[s.name],
                dataclasses.fields(hints[s.name]), s.metadata.get("trains", True)) for s in sections]
    for title, prefix, cls, fields, trains in groups:
        lines += [f"## {title}", "", "| key | type | default | resume | what it does |", "|---|---|---|---|---|"]
        field_hints = typing.get_type_hints(cls)
        for f in fields:
            moves = trains and f.metadata.get("trains", True)
            doc = f.metadata["doc"].replace("|", "\\|")
            lines.append(f"| `{prefix}{f.name}` | {_type_name(field_hints[f.name])} | {_default(f)} | "
                         f"{'retrains' if moves else 'free'} | {doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
