"""Test-only fault injection, loaded by every Python process a test starts with `faults.env(...)`.

Python imports `sitecustomize` at start-up from the path, so putting this folder first on PYTHONPATH
reaches the processes our CLI spawns (torchrun ranks, decoder processes) without any hook in the
product's code. Each fault wraps a module-level function the product calls through its module.

SWAV_FAULT_KILL_UPLOAD=STEP:N    rank 0 SIGKILLs itself after uploading N files of the checkpoint at
                                 STEP, as a preempted machine would mid-upload.
SWAV_FAULT_KILL_DECODER=PREFIX   a decoder process SIGKILLs itself on an object whose bytes start with
                                 PREFIX, the way the OOM killer or a codec segfault ends it.
"""

import os
import signal


def _kill_upload(spec: str) -> None:
    from swav import checkpoint

    step, n = (int(x) for x in spec.split(":"))
    original, done = checkpoint.upload_file, [0]

    def upload_file(fs, local_path: str, path: str) -> None:
        original(fs, local_path, path)
        if f"/{checkpoint.rank_dir(0)}/" in path and f"/{checkpoint.tag_for(step)}/" in path:
            done[0] += 1
            if done[0] >= n:
                os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.upload_file = upload_file


def _kill_decoder(marker: str) -> None:
    from pipeline import normalise

    original = normalise.normalise

    def poisoned(data: bytes, cfg):
        if data.startswith(marker.encode("utf-8")):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(data, cfg)

    normalise.normalise = poisoned


if os.environ.get("SWAV_FAULT_KILL_UPLOAD"):
    _kill_upload(os.environ["SWAV_FAULT_KILL_UPLOAD"])
if os.environ.get("SWAV_FAULT_KILL_DECODER"):
    _kill_decoder(os.environ["SWAV_FAULT_KILL_DECODER"])
