"""The node-local staging folder of a run's checkpoints: where it is, and that nothing is left in it.

Checkpoints are written here before upload, and a resume downloads here before DeepSpeed loads. A run
that ends, normally or on an error, leaves nothing behind; one that was SIGKILLed (a preemption past its
grace period) can leave a whole checkpoint's files, which the next run of the same job removes before it
starts.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile

PREFIX = "swav-stage-"
_OURS = ("step-", "resume-")   # the only sub-folders a run creates (swav/train.py)


def stage_root(checkpoint_url: str, stage_dir: str = "", node: str = "") -> str:
    """This run's folder inside `stage_dir` (default: the temp dir), named by its checkpoint URL and node.

    Runs of different jobs can share a `stage_dir`, and so can the nodes of one job (a Lustre or NFS
    path): each node clears and downloads into a folder of its own. A rerun of the same job on the
    same node finds its folder again.
    """
    parent = stage_dir or tempfile.gettempdir()
    host = re.sub(r"[^A-Za-z0-9_.-]+", "_", node or socket.gethostname())[:64] or "node"
    return os.path.join(parent, f"{PREFIX}{hashlib.sha1(checkpoint_url.encode()).hexdigest()[:12]}-{host}")


def sweep(root: str) -> list[str]:
    """Delete what an earlier, killed run of this job left in `root`; the names removed.

    Call it on one rank per node before any rank of the run stages or downloads anything.
    """
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith(_OURS))
    except FileNotFoundError:
        return []
    for name in names:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return names


def remove_if_empty(*paths: str) -> None:
    """rmdir each path in order, quietly keeping any that still hold something.

    Several ranks of a node each call this after removing their own files; whichever removes the
    last file removes the folder, the others find it gone or not yet empty.
    """
    for path in paths:
        try:
            os.rmdir(path)
        except OSError:   # not empty (another rank's files), or already removed by one
            pass


def tidy(root: str) -> None:
    """Remove the empty folders a run leaves under `root` (a save whose upload failed, a resume that
    failed), then `root` itself if that empties it.

    Only empty folders go: files another rank of the node still needs stay where they are.
    """
    for folder, _, _ in os.walk(root, topdown=False):
        remove_if_empty(folder)
