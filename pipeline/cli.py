"""`swav shards ...`: argument parsing over pipeline.build/merge/inspect."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.normalise import NormaliseConfig
from shards.members import IMAGE_EXTENSIONS
from swav_io.cliflags import add_storage_flags, storage_options
from swav_io.errors import UserError
from swav_io.storage import redact_text


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part takes I/N, e.g. 3/16, not {text!r}") from None
    return i, n


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `shards build|info|verify`; returns the `shards` sub-commands so the app can add its own."""
    sp = sub.add_parser("shards", help="build, inspect and verify shard sets",
                        description="Shard sets: WebDataset tars + parquet manifests + index + build record.")
    ssub = sp.add_subparsers(dest="shards_command", metavar="{build,index,info,verify,peek}")
    d = NormaliseConfig()
    b = ssub.add_parser("build", help="build a shard set from a bucket of raw images",
                        description="List SRC, validate and normalise every object, and write a shard set to DST. "
                                    "Safe to kill and rerun: finished shards are kept, the result is identical.")
    b.add_argument("src", metavar="SRC", help="source prefix: local path, file://, s3://bucket/prefix, gs://...")
    b.add_argument("dst", metavar="DST", help="destination prefix for the shard set (any fsspec URL)")
    b.add_argument("--part", type=_part, default=(0, 1), metavar="I/N",
                   help="build only part I of N (disjoint by a hash of the object path); run --merge after all parts")
    b.add_argument("--merge", type=int, default=0, metavar="N",
                   help="instead of building, publish the index of a set built as N parts")
    b.add_argument("--incremental", action="store_true",
                   help="on a finished build: list SRC again and add only the objects that are new since its "
                        "listing snapshot, as new shards (existing shards stay untouched); then publish")
    b.add_argument("--from-list", metavar="FILE",
                   help="take the objects from FILE instead of listing SRC: parquet or CSV (.gz too) with a url "
                        "column, a key column (with bucket, as in an S3 Inventory report) or a path column "
                        "relative to SRC; a headerless CSV is read as S3 Inventory's layout")
    b.add_argument("--seed", type=int, default=0,
                   help="seed of the pack order, a pseudo-random permutation that makes every shard an i.i.d. "
                        "sample of the bucket whatever its folder layout (default 0; recorded in build.json)")
    b.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar (default 1000)")
    b.add_argument("--shard-max-bytes", type=int, default=256 * 1024 * 1024,
                   help="close a tar once its images reach this many bytes (default 256 MiB)")
    b.add_argument("--max-side", type=int, default=d.max_side, help=f"longer side after resizing (default {d.max_side})")
    b.add_argument("--min-side", type=int, default=d.min_side, help=f"reject a shorter side below this (default {d.min_side})")
    b.add_argument("--max-aspect", type=float, default=d.max_aspect,
                   help=f"reject longer/shorter above this (default {d.max_aspect})")
    b.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"refuse, undecoded, images whose header claims more pixels (default {d.max_pixels})")
    b.add_argument("--quality", type=int, default=d.quality, help=f"JPEG quality of re-encoded images (default {d.quality})")
    b.add_argument("--workers", type=int, default=0, help="decode processes (default: one per core)")
    b.add_argument("--io-threads", type=int, default=16, help="concurrent reads from the source (default 16)")
    b.add_argument("--work-dir", default="", help="local folder for the part's file of accepted content hashes "
                   "(its in-part duplicate check, on disk so memory stays flat; about 40 bytes per accepted "
                   "object, removed when the part finishes; default: the temp dir)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_flags(b)
    x = ssub.add_parser("index", help="make existing WebDataset tars (img2dataset, LAION, ...) a shard set",
                        description="Write an index and build record at DST for WebDataset tars another tool wrote, "
                                    "without rewriting them; then `swav pretrain data.url=DST` streams them. Counts "
                                    "come from img2dataset's <shard>_stats.json when present, else from a scan.")
    x.add_argument("source", metavar="SOURCE",
                   help="the tars: a brace pattern (s3://b/laion/{00000..41455}.tar), a prefix (every .tar under "
                        "it) or a list file (.txt/.csv/.parquet, one tar URL per line or a url column)")
    x.add_argument("dst", metavar="DST", help="where the index and build record go (the tars stay where they are)")
    x.add_argument("--image-ext", default=",".join(IMAGE_EXTENSIONS), metavar="EXTS",
                   help="member extensions taken as the image, first present wins (default %(default)s)")
    x.add_argument("--scan", action="store_true",
                   help="read every tar even where img2dataset stats exist (records sizes, sha256, left-out samples)")
    x.add_argument("--skip-missing", action="store_true", help="index the tars that exist when SOURCE names absent ones")
    x.add_argument("--threads", type=int, default=16, help="concurrent tar reads (default 16)")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_flags(x)
    i = ssub.add_parser("info", help="counts by status, shards, bytes, size histogram",
                        description="Summarise a published shard set from its index and manifests.")
    i.add_argument("dst", metavar="DST", help="shard set URL")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_storage_flags(i)
    v = ssub.add_parser("verify", help="re-read every shard and check it against the index (exit 1 on mismatch)",
                        description="Re-read every shard: size, sha256, sample count, member names, image hashes.")
    v.add_argument("dst", metavar="DST", help="shard set URL")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_flags(v)
    sp.set_defaults(func=lambda a: run(a, sp))
    return ssub


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.shards_command is None:
        parser.print_help()
        return 2
    opts = storage_options(args)
    if args.shards_command == "build":
        from pipeline.build import BuildConfig, build, build_part, summary_lines
        from pipeline.merge import merge

        if args.merge:
            rec = merge(args.dst, args.merge, opts, work_dir=args.work_dir)
            print(f"published {redact_text(args.dst)}: {rec['shards']} shards, {rec['samples']} samples, "
                  f"{rec['counts']['inputs']} inputs ({rec['cross_part_duplicates']} cross-part duplicates dropped)")
            return 0
        part, num_parts = args.part
        cfg = BuildConfig(samples_per_shard=args.samples_per_shard, shard_max_bytes=args.shard_max_bytes,
                          workers=args.workers, io_threads=args.io_threads, part=part, num_parts=num_parts,
                          seed=args.seed, incremental=args.incremental, from_list=args.from_list,
                          work_dir=args.work_dir,
                          normalise=NormaliseConfig(max_side=args.max_side, min_side=args.min_side,
                                                    max_aspect=args.max_aspect, max_pixels=args.max_pixels,
                                                    quality=args.quality))
        fn = build if num_parts == 1 else build_part
        result = fn(args.src, args.dst, cfg, opts, opts, progress=not args.no_progress)
        if result.already_complete:
            print(f"part {part}/{num_parts} of {redact_text(args.dst)} is already complete; nothing to do "
                  f"(--incremental adds objects that are new since its listing)")
        elif result.generation:
            print(f"addition {result.generation}: {result.added_inputs} new object(s) since the last listing")
        print("\n".join(summary_lines(result)))
        if num_parts > 1:
            print(f"part {part}/{num_parts} done; after all parts: swav shards build {redact_text(args.src)} "
                  f"{redact_text(args.dst)} "
                  f"--merge {num_parts}")
        return 0
    if args.shards_command == "index":
        from pipeline.wdsindex import index_webdataset
        from pipeline.wdsindex import summary_lines as index_summary

        exts = [e.strip() for e in args.image_ext.split(",") if e.strip()]
        if not exts:
            raise UserError("--image-ext needs at least one extension, e.g. jpg,png")
        rec = index_webdataset(args.source, args.dst, opts, threads=args.threads, image_extensions=exts,
                               scan=args.scan, skip_missing=args.skip_missing, progress=not args.no_progress)
        print("\n".join(index_summary(rec)))
        print(f"published {redact_text(args.dst)}: swav pretrain <job> data.url={redact_text(args.dst)}")
        return 0
    if args.shards_command == "info":
        from pipeline.inspect import format_info, info

        d = info(args.dst, opts)
        print(json.dumps(d, indent=2) if args.json else format_info(d))
        return 0
    if args.shards_command == "verify":
        from pipeline.inspect import verify

        rep = verify(args.dst, opts, progress=not args.no_progress)
        for p in rep.problems:
            print(f"MISMATCH {p}", file=sys.stderr)
        print(f"verified {rep.shards} shards, {rep.samples} samples: "
              f"{'OK' if rep.ok else f'{len(rep.problems)} problem(s)'}")
        return 0 if rep.ok else 1
    raise AssertionError(args.shards_command)
