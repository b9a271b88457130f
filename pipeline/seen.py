"""The content hashes a build part has accepted, for its in-part duplicate check, in bounded memory.

A Python set of hex digests costs about 160 MB per million accepted objects, and a part of a
billion-object bucket holds hundreds of millions. The hashes live in a local SQLite file instead
(stdlib, a B-tree on disk behind a page cache of fixed size): memory stays flat in the number of
objects. The file is a cache of what the committed manifests say, never the record: it notes how many
manifests it holds, catches up from the manifests committed since, and is rebuilt from them when it
does not match (another machine, a deleted temp dir). Hashes of the shard being built stay in memory
until its manifest commits, so a crash never leaves a hash for an object that was not committed.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
from typing import Iterable

from swav_io.system import pid_alive

# The page cache SQLite may hold; the rest of the file stays on disk.
CACHE_BYTES = 64 * 1024 * 1024


def _key(sha_hex: str) -> bytes:
    # 128 bits of the sha256: two different images share them with odds ~n^2 / 2^129 (1e-21 at 1e9).
    return bytes.fromhex(sha_hex[:32])


def manifest_digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def seen_path(dst: str, part: int, num_parts: int, work_dir: str = "") -> str:
    """This process's file for a part in `work_dir` (default: the temp dir).

    Named by destination, part and process: two copies of one part (a duplicated pod) never share
    one. A file that a killed run of the same part left is adopted (renamed to ours), so a rerun
    catches up from it instead of reading every hash again; any others are removed.
    """
    folder = work_dir or tempfile.gettempdir()
    stem = "swav-seen-" + hashlib.sha1(f"{dst.rstrip('/')}|{part}|{num_parts}".encode()).hexdigest()[:16]
    mine = os.path.join(folder, f"{stem}-{os.getpid()}.sqlite")
    try:
        names = [n for n in os.listdir(folder) if n.startswith(stem + "-") and n.endswith(".sqlite")]
    except FileNotFoundError:
        return mine
    left = []
    for name in names:
        pid = name[len(stem) + 1:-len(".sqlite")]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            left.append(os.path.join(folder, name))
    left.sort(key=lambda p: os.path.getmtime(p) if os.path.exists(p) else 0)
    for i, path in enumerate(reversed(left)):
        try:
            if i == 0:
                os.replace(path, mine)
            else:
                os.remove(path)
        except FileNotFoundError:   # another copy adopted or removed it first
            pass
    return mine


class SeenHashes:
    """A set of sha256 hex digests: committed ones in SQLite, the pending shard's in memory."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # A cache that is checked against the manifests on open: durability is not needed, speed is.
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute(f"PRAGMA cache_size=-{CACHE_BYTES // 1024}")
        self.db.execute("PRAGMA temp_store=FILE")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (h BLOB PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER)")
        self.pending: set[bytes] = set()

    @property
    def manifests(self) -> int:
        """How many of the part's manifests (0, 1, ...) the file holds the hashes of."""
        row = self.db.execute("SELECT v FROM meta WHERE k = 'manifests'").fetchone()
        return int(row[0]) if row else 0

    def reset(self) -> None:
        self.db.execute("DELETE FROM seen")
        self.db.execute("DELETE FROM meta")
        self.pending.clear()

    @property
    def tail(self) -> str:
        """Digest of the last manifest the file holds, to tell this build's manifests from another's."""
        row = self.db.execute("SELECT v FROM meta WHERE k = 'tail'").fetchone()
        return str(row[0]) if row else ""

    def __contains__(self, sha_hex: str) -> bool:
        h = _key(sha_hex)
        if h in self.pending:
            return True
        return self.db.execute("SELECT 1 FROM seen WHERE h = ?", (h,)).fetchone() is not None

    def add(self, sha_hex: str) -> None:
        self.pending.add(_key(sha_hex))

    def commit(self, manifests: int, tail: str, hashes: Iterable[str] = ()) -> None:
        """The pending hashes (and `hashes`) belong to committed manifests now: the file holds the first
        `manifests` of them, the last of which has digest `tail`."""
        rows = [(h,) for h in self.pending] + [(_key(h),) for h in hashes]
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?)", rows)
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [("manifests", manifests), ("tail", tail)])
        self.db.execute("COMMIT")
        self.pending.clear()

    def close(self, remove: bool = False) -> None:
        self.db.close()
        if remove:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
