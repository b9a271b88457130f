"""The jobs shipped with the package (jobs/ in a checkout, `swav_jobs` once installed), found by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from swav_io.errors import UserError


def jobs_dir() -> Path:
    """Where the shipped job YAMLs and DeepSpeed JSONs are, in a checkout or an installed package."""
    return Path(str(resources.files("swav_jobs")))


def shipped_jobs() -> dict[str, str]:
    """{name: first comment line} of every shipped job."""
    out = {}
    for path in sorted(jobs_dir().glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


def resolve_config(arg: str) -> str:
    """A config argument as a file path: an existing file as given, else a shipped job's name."""
    if Path(arg).is_file():
        return arg
    name = Path(arg).name.removesuffix(".yaml")
    candidate = jobs_dir() / f"{name}.yaml"
    if candidate.is_file() and (name == arg or arg.endswith(f"{name}.yaml")):
        return str(candidate)
    raise UserError(f"config {arg!r} is neither a file nor a shipped job; shipped jobs: "
                    f"{', '.join(shipped_jobs())} (see `swav jobs`)")
