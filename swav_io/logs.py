"""One logging setup for every entry point: timestamps, rank 0 talks, others only warn."""

from __future__ import annotations

import logging
import os
import sys

from swav_io.storage import redact_text

_FORMAT = "%(asctime)s %(levelname).1s [%(name)s%(rank)s] %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = f" r{self.rank}" if self.rank else ""
        return True


class _RedactingFormatter(logging.Formatter):
    """Every line, ours or a library's, loses URL-embedded credentials and connection-string secrets."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def env_rank() -> int:
    """This process's global rank as the launchers (deepspeed, torchrun, SLURM) tell it."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> None:
    """Configure the root logger once; safe to call again (it replaces our handler)."""
    rank = env_rank() if rank is None else rank
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_swav_stream", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._swav_stream = True  # type: ignore[attr-defined]
    handler.setFormatter(_RedactingFormatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_RankFilter(rank))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    # Third-party chatter drowns the health signals users need to see.
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if rank == 0:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
