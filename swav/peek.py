"""`swav shards peek`: what the trainer's batches hold, through the training loader's own split.

Each rank's loader is built exactly as ``swav pretrain`` builds it (same seed, shard order, shuffle
window, ranks x workers), but its batches carry each sample's source URL instead of crops. The
summary compares the distinct source folders per batch with what an i.i.d. batch of the same size
would hold, given the folder frequencies seen.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, TextIO

from shards.index import load_index
from swav.data import build_loader, next_batch


def folder(url: str) -> str:
    """The source folder of a sample (for `<tar>#<key>` names, the key's folder inside the tar)."""
    head, _, key = url.partition("#")
    path = f"{head}#{key}" if key and "/" in key else head
    return path.rsplit("/", 1)[0] if "/" in path else path


def one_pass_batches(cfg: Any, ranks: int, cap: int = 1000) -> int:
    """Batches per rank that together hold as many samples as the set (at least 1, at most `cap`)."""
    total = int(load_index(cfg.data.url, cfg.data.storage_options).samples.sum())
    return max(1, min(cap, total // (ranks * cfg.train.batch_size)))


def peek_batches(cfg: Any, ranks: int, batches: int, out: TextIO | None = None) -> list[dict]:
    """The first `batches` batches of every rank, in delivery order: {rank, batch, urls, shards}."""
    rows = []
    for rank in range(ranks):
        loader = build_loader(cfg, rank, ranks, describe=True)
        it = iter(loader)
        for b in range(batches):
            got = next_batch(it)
            row = {"rank": rank, "batch": b, "urls": got["urls"], "shards": got["shards"], "ids": got["ids"]}
            rows.append(row)
            if out is not None:
                out.write(json.dumps({"rank": rank, "batch": b, "urls": got["urls"]}) + "\n")
        del it, loader
    return rows


def iid_expected(counts: Counter, batch: int) -> float:
    """Distinct folders expected in a batch drawn i.i.d. from these folder frequencies."""
    total = sum(counts.values())
    return sum(1.0 - (1.0 - n / total) ** batch for n in counts.values())


def summarise(rows: list[dict]) -> dict:
    per_batch = [len({folder(u) for u in r["urls"]}) for r in rows]
    shards = [len(set(r["shards"])) for r in rows]
    counts = Counter(folder(u) for r in rows for u in r["urls"])
    batch = len(rows[0]["urls"]) if rows else 0
    urls = [u for r in rows for u in r["urls"]]
    # A sample is (shard, ordinal): two source files with equal URLs are still two samples.
    ids = [tuple(i) for r in rows for i in r.get("ids", [])] or urls
    repeats = [len(r["ids"]) - len({tuple(i) for i in r["ids"]}) for r in rows] if rows and "ids" in rows[0] else [0]
    return {"coverage": len(set(ids)) / max(1, len(ids)), "distinct": len(set(ids)), "delivered": len(ids),
            "repeats_per_batch_mean": sum(repeats) / max(1, len(repeats)), "repeats_per_batch_max": max(repeats),
"batches": len(rows), "batch_size": batch, "folders_seen": len(counts),
            "folders_per_batch_mean": sum(per_batch) / max(1, len(per_batch)),
            "folders_per_batch_min": min(per_batch, default=0),
            "folders_per_batch_iid": iid_expected(counts, batch) if counts else 0.0,
            "shards_per_batch_mean": sum(shards) / max(1, len(shards)),
            "repeated_samples": len(urls) - len(set(urls))}


def format_summary(s: dict) -> str:
    lines = [f"{s['batches']} batches of {s['batch_size']}",
             f"coverage: {s['distinct']} distinct of {s['delivered']} delivered samples ({100 * s['coverage']:.1f}%)",
             f"repeated samples inside a batch: mean {s['repeats_per_batch_mean']:.2f}, max {s['repeats_per_batch_max']}",
             f"source folders per batch: mean {s['folders_per_batch_mean']:.2f}, min {s['folders_per_batch_min']} "
             f"(an i.i.d. batch would hold {s['folders_per_batch_iid']:.2f} of the {s['folders_seen']} seen)",
             f"shards per batch: mean {s['shards_per_batch_mean']:.1f}",
             f"samples seen twice across these batches: {s['repeated_samples']}"]
    if s["repeats_per_batch_max"]:
        lines.append("warning: a batch holds the same sample twice; the set is smaller than a batch per reader")
    if s["folders_per_batch_iid"] and s["folders_per_batch_mean"] < 0.8 * s["folders_per_batch_iid"]:
        lines.append("warning: batches cover far fewer folders than i.i.d. batches would; SwAV's per-batch "
                     "equipartition will split folders. Rebuild the set (shuffled pack order) or raise "
                     "data.shuffle_window.")
    return "\n".join(lines)

