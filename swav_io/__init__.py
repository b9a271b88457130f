"""Generic I/O every side of the project imports: storage, retries, errors, logging, storage flags.

Nothing here knows about shard sets or training, so ``shards``, ``pipeline`` and ``swav`` all
import it and it imports none of them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swav-stream")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
