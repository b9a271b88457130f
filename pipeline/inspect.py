"""`swav shards info` and `swav shards verify`: what a shard set holds, and whether it is intact."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from pipeline.merge import manifest_paths
from shards.index import load_index
from shards.manifest import ACCEPTED, from_parquet_bytes
from shards.members import UnsafeMember
from shards.tario import iter_samples
from swav_io.storage import get_fs, read_bytes, with_retries

log = logging.getLogger(__name__)

SIZE_BINS = (0, 64, 128, 256, 512, 1024, 2048, 4096, 1 << 30)


def info(url: str, options: dict | None = None) -> dict:
    """Counts by status and reason, and a histogram of accepted sizes: columnar, one manifest at a time."""
    idx = load_index(url, options)
    fs, root = get_fs(url, options)
    by_status: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    hist = np.zeros(len(SIZE_BINS) - 1, np.int64)
    for m in manifest_paths(fs, root) if idx.image_extensions is None else []:
        table = from_parquet_bytes(read_bytes(fs, m), columns=["status", "reason", "width", "height"])
        for item in pc.value_counts(table["status"]).to_pylist():
            by_status[item["values"]] = by_status.get(item["values"], 0) + item["counts"]
        accepted = pc.equal(table["status"], ACCEPTED)
        for item in pc.value_counts(table["reason"].filter(pc.invert(accepted))).to_pylist():
            by_reason[item["values"]] = by_reason.get(item["values"], 0) + item["counts"]
        sides = pc.max_element_wise(table["width"].filter(accepted), table["height"].filter(accepted))
        sides = sides.to_numpy(zero_copy_only=False)
        sides = sides[~np.isnan(sides)] if sides.dtype.kind == "f" else sides
        hist += np.histogram(sides[sides > 0], bins=SIZE_BINS)[0]
    return {
        "url": url, "shards": int(len(idx)), "samples": int(idx.samples.sum()), "bytes": int(idx.nbytes.sum()),
        "inputs": sum(by_status.values()), "by_status": by_status, "by_reason": by_reason,
        "longer_side_histogram": {f"{SIZE_BINS[i]}-{SIZE_BINS[i + 1] - 1}": int(n) for i, n in enumerate(hist) if n},
        "record": {k: idx.record.get(k) for k in ("version", "created", "source", "num_parts", "format",
                                                  "shard_root")},
    } if idx.image_extensions is None else {
        # an indexed WebDataset set: no manifests; what the scan would leave out is in the record
        "url": url, "shards": int(len(idx)), "samples": int(idx.samples.sum()), "bytes": int(idx.nbytes.sum()),
        "inputs": int(idx.samples.sum()) + sum(idx.record.get("left_out", {}).values()),
        "by_status": {ACCEPTED: int(idx.samples.sum()), "left_out": sum(idx.record.get("left_out", {}).values())},
        "by_reason": dict(idx.record.get("left_out", {})), "longer_side_histogram": {},
        "record": {k: idx.record.get(k) for k in ("version", "created", "source", "num_parts", "format",
                                                  "shard_root")},
    }


def format_info(d: dict) -> str:
    lines = [f"shard set  {d['url']}", f"source     {d['record'].get('source')}",
             f"built      {d['record'].get('created')} (swav-stream {d['record'].get('version')}, "
             f"{d['record'].get('num_parts')} part(s))" if d['record'].get('format') != "webdataset" else
             f"indexed    {d['record'].get('created')}: WebDataset tars at {d['record'].get('shard_root')}",
             f"shards     {d['shards']}", f"samples    {d['samples']}", f"bytes      {d['bytes']}",
             f"inputs     {d['inputs']}"]
    for s, n in sorted(d["by_status"].items()):
        lines.append(f"  {s:<18}{n:>10}")
    for r, n in sorted(d["by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {r:<16}{n:>10}")
    lines.append("accepted images by original longer side (px):")
    for b, n in d["longer_side_histogram"].items():
        lines.append(f"  {b:<18}{n:>10}")
    return "\n".join(lines)


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(url: str, options: dict | None = None, progress: bool = True) -> VerifyReport:
    """Re-read every shard: bytes, sha256, sample count, member names and sample metadata against the index."""
    idx = load_index(url, options)
    fs, _ = get_fs(url, options)
    report = VerifyReport()
    shas = idx.sha256.to_pylist()
    foreign = idx.image_extensions
    for i in tqdm(range(len(idx)), desc="verify", unit="shard", disable=not progress):
        name = idx.name(i)
        path = fs._strip_protocol(idx.shard_url(i))
        report.shards += 1
        try:
            data = with_retries(lambda p=path: fs.cat_file(p), f"read {name}")
        except FileNotFoundError:
            report.problems.append(f"{name}: missing")
            continue
        if len(data) != idx.nbytes[i]:
            report.problems.append(f"{name}: {len(data)} bytes, index says {idx.nbytes[i]}")
        if shas[i] is not None and hashlib.sha256(data).hexdigest() != shas[i]:
            report.problems.append(f"{name}: sha256 differs from the index")
        count = 0
        try:
            for s in iter_samples(io.BytesIO(data), foreign):
                if foreign is not None:   # another tool's tar: its metadata is its own business
                    count += 1
                    continue
                meta = json.loads(s["json"])
                if hashlib.sha256(s["jpg"]).hexdigest() != meta.get("sha256"):
                    report.problems.append(f"{name}: {s['__key__']} image hash differs from its metadata")
                count += 1
        except (UnsafeMember, OSError, ValueError) as e:
            report.problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
        if count != idx.samples[i]:
            report.problems.append(f"{name}: {count} samples, index says {idx.samples[i]}")
        report.samples += count
    rec = idx.record.get("counts", {})
    if rec and rec.get("inputs") != rec.get("accepted", 0) + rec.get("rejected", 0):
        report.problems.append("build record: inputs != accepted + rejected")
    if rec and rec.get("accepted") != int(idx.samples.sum()):
        report.problems.append(f"build record says {rec.get('accepted')} accepted, index holds {int(idx.samples.sum())}")
    return report
