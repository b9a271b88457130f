"""The `swav` command: a thin argparse layer over importable functions.

This module and ``swav.demo`` are the application layer: they may compose the
sharding pipeline with training. The training modules never import ``pipeline``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.cli import register
from swav import __version__
from swav_io.cliflags import add_storage_flags, storage_options
from swav_io.errors import UserError, debug_enabled, print_cause
from swav_io.logs import setup_logging
from swav_io.storage import merge_options, redact_text

log = logging.getLogger("swav")


def _pretrain(args: argparse.Namespace) -> int:
    from swav.catalog import resolve_config
    from swav.config import load_config

    cfg = load_config(resolve_config(args.config), args.overrides)
    _apply_storage_flags(cfg, _opts(args))
    from swav.train import pretrain  # after the config is checked: a typo is reported without loading torch

    pretrain(cfg, dry_run=args.dry_run)
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from swav.catalog import jobs_dir, shipped_jobs

    jobs = shipped_jobs()
    width = max(map(len, jobs), default=0)
    for name, what in jobs.items():
        print(f"{name:<{width}}  {what}")
    print(f"\n{len(jobs)} jobs in {jobs_dir()}; run one with `swav pretrain NAME data.url=... [key=value ...]`, "
          f"or copy its YAML and edit it")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from swav.evaluate import run_eval_cli

    return run_eval_cli(args)


def _export(args: argparse.Namespace) -> int:
    from swav.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, fmt=args.format, include_head=args.include_head,
                             storage_options=_opts(args))
    print(f"wrote {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from swav.report import write_report

    out = write_report(args.run, args.out)
    print(f"wrote {', '.join(out)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from swav.demo import run_demo

    run_demo(args.out, steps=args.steps, endpoint_url=args.endpoint_url, fresh=args.fresh, seed=args.seed,
             overrides=args.overrides)
    return 0


def _peek(args: argparse.Namespace) -> int:
    from swav.config import load_config
    from swav.peek import format_summary, peek_batches, summarise

    overrides = [*args.overrides, f"data.url={args.set}", f"data.num_workers={args.workers}"]
    cfg = load_config(args.config or None, overrides)
    _apply_storage_flags(cfg, _opts(args))
    if args.ranks < 1 or args.batches < 0 or args.workers < 0:
        raise UserError("--ranks must be >= 1, --batches and --workers >= 0")
    if args.batches == 0:
        from swav.peek import one_pass_batches

        args.batches = one_pass_batches(cfg, args.ranks)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            rows = peek_batches(cfg, args.ranks, args.batches, f)
    else:
        rows = peek_batches(cfg, args.ranks, args.batches)
    print(f"{args.set}: {args.ranks} rank(s) x {max(1, args.workers)} worker(s), seed {cfg.seed}, "
          f"shuffle window {cfg.data.shuffle_window} pieces")
    print(format_summary(summarise(rows)))
    if args.out:
        print(f"wrote {args.out} (one JSON line per batch: rank, batch, urls)")
    return 0


def _apply_storage_flags(cfg, opts: dict) -> None:
    """The storage flags and SWAV_STORAGE_OPTIONS reach data and checkpoints alike; on top of the config's
    own storage_options, so a flag or the environment wins (as in `swav shards build`)."""
    if opts:
        cfg.data.storage_options = merge_options(cfg.data.storage_options, opts)
        cfg.checkpoint.storage_options = merge_options(cfg.checkpoint.storage_options, opts)


def _opts(args: argparse.Namespace) -> dict:
    return storage_options(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swav", description="swav-stream: shard raw image buckets, stream-pretrain "
                                "SwAV wide ResNet-50s with DeepSpeed, resume from cloud checkpoints.")
    p.add_argument("--version", action="version", version=f"swav-stream {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="after a one-line error, also print the exception it replaces (or set SWAV_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="{shards,pretrain,jobs,eval,export,report,demo}")
    _add_peek(register(sub))
    _add_pretrain(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_report(sub)
    _add_demo(sub)
    _add_compare(sub)
    return p


def _add_peek(shards_sub: argparse._SubParsersAction) -> None:
    pk = shards_sub.add_parser("peek", help="what the trainer's batches hold: source URLs per batch, and a summary",
                               description="Run the training loader's split over ranks and workers (no "
                                           "augmentation) and write one JSON line per delivered batch: "
                                           '{"rank", "batch", "urls"}. Overrides are config keys, e.g. seed=3 '
                                           "train.batch_size=64 data.shuffle_window=16.")
    pk.add_argument("set", metavar="SET", help="shard set URL")
    pk.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    pk.add_argument("--config", default="", help="job YAML whose data/seed/batch settings to use (default: defaults)")
    pk.add_argument("--ranks", type=int, default=1, help="ranks to simulate (default 1)")
    pk.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank (default 0)")
    pk.add_argument("--batches", type=int, default=0,
                    help="batches per rank (default 0: one pass over the set, i.e. its samples / global batch, "
                         "at most 1000)")
    pk.add_argument("--out", default="", help="write the batches as JSON lines here")
    add_storage_flags(pk)
    pk.set_defaults(func=_peek)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    pt = sub.add_parser("pretrain", help="SwAV pretraining from a shard set (one process or under deepspeed/torchrun)",
                        description="Run SwAV pretraining. CONFIG is a YAML file (see jobs/); overrides are dotted "
                                    "key=value pairs, e.g. train.steps=500 deepspeed.zero_stage=2. Rerunning the "
                                    "same command resumes from the latest checkpoint.")
    pt.add_argument("config", metavar="CONFIG", help="YAML config file, or the name of a shipped job (`swav jobs`)")
    pt.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    pt.add_argument("--dry-run", action="store_true", help="resolve the config, build the model, print, and stop")
    add_storage_flags(pt)
    pt.set_defaults(func=_pretrain)

    jb = sub.add_parser("jobs", help="list the shipped jobs (`swav pretrain NAME` runs one)",
                        description="The job YAMLs shipped with the package, and where they are installed.")
    jb.set_defaults(func=_jobs)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="kNN or linear-probe evaluation of frozen trunk features",
                        description="Evaluate frozen trunk features on a labelled image folder (class per "
                                    "sub-folder) or shard set with labels in the sample JSON.")
    esub = ev.add_subparsers(dest="eval_kind", metavar="{knn,linear,finetune}")
    kinds = (("knn", "weighted kNN (k=20 and 200, T=0.07, cosine)"),
             ("linear", "linear probe (SGD, cosine lr; --augment trains on augmented views)"),
             ("finetune", "fine-tune the whole network on a class-balanced fraction of the train labels"))
    for kind, hlp in kinds:
        e = esub.add_parser(kind, help=hlp, description=hlp)
        _add_eval_common(e)
        if kind in ("linear", "finetune"):
            _add_training_flags(e, kind)
        add_storage_flags(e)
    ev.set_defaults(func=_eval)


def _add_eval_common(e: argparse.ArgumentParser) -> None:
    e.add_argument("--checkpoint", default="", help="checkpoint URL (a run's checkpoint dir or one step's)")
    e.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised trunk instead")
    e.add_argument("--arch", default="", help="trunk arch (default: from the checkpoint's config)")
    e.add_argument("--train", required=True, help="labelled training images: a folder with one sub-folder per "
                                                 "class, or a shard set (see --label); streamed in batches")
    e.add_argument("--val", required=True, help="labelled validation images, same kind")
    e.add_argument("--image-size", type=int, default=224, help="resize+center-crop size (default 224)")
    e.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    e.add_argument("--seed", type=int, default=0, help="seed for random init, subsets, held-out split and training")
    e.add_argument("--device", default="cpu", help="where features are computed and compared (cpu, cuda, cuda:1)")
    e.add_argument("--label", default="folder", metavar="SOURCE",
                   help="class of a shard-set sample: folder (parent folder of its source URL), json:FIELD "
                        "(a field of its JSON member) or cls (its .cls member); default folder")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--out", default="", help="write results as JSON here")


def _add_training_flags(e: argparse.ArgumentParser, kind: str) -> None:
    finetune = kind == "finetune"
    e.add_argument("--epochs", type=int, default=20 if finetune else 100,
                   help=f"schedule length in epochs (default {20 if finetune else 100}); the epoch to stop at is "
                        "chosen on a held-out tenth of the train labels")
    e.add_argument("--lr", type=float, default=0.1 if finetune else 0.3,
                   help="head lr at batch 256, middle of the grid lr/3, lr, 3 lr searched on the held-out tenth "
                        f"(default {0.1 if finetune else 0.3})")
    e.add_argument("--weight-decay", type=float, default=1e-6 if not finetune else 1e-4,
                   help="weight decay")
    e.add_argument("--no-flip", action="store_true", help="no horizontal flips in the training views")
    if finetune:
        e.add_argument("--fraction", type=float, default=0.1,
                       help="class-balanced fraction of the train labels to use (the paper: 0.01 and 0.1; 1.0 = "
                            "full fine-tuning); default 0.1")
        e.add_argument("--subset-file", default="",
                       help="where the subset is written and reused (default subset-F-seedS.json here)")
        e.add_argument("--trunk-lr-scale", type=float, default=0.1, help="trunk lr = head lr x this (default 0.1)")
    else:
        e.add_argument("--augment", action="store_true",
                       help="train the head on random resized crops and flips of the train images (as the "
                            "reference) instead of frozen center-crop features")


def _add_export(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="export trunk (and optionally head) weights as a plain state_dict",
                        description="Export weights from any checkpoint URL, ZeRO-sharded ones included.")
    ex.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint URL (run checkpoint dir or one step's)")
    ex.add_argument("out", metavar="OUT", help="output .pt file (local path or fsspec URL)")
    ex.add_argument("--format", choices=("torchvision", "swav"), default="torchvision",
                    help="torchvision: keys load into torchvision.models.resnet50; swav: the reference release's keys")
    ex.add_argument("--include-head", action="store_true", help="also export projection head and prototypes (swav format)")
    add_storage_flags(ex)
    ex.set_defaults(func=_export)


def _add_report(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("report", help="plots and a summary table from a run's metrics.jsonl",
                        description="Turn RUN/metrics.jsonl into PNG plots and a markdown summary.")
    rp.add_argument("run", metavar="RUN", help="run directory (holds metrics.jsonl)")
    rp.add_argument("--out", default="", help="output folder (default: RUN/report)")
    rp.set_defaults(func=_report)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    dm = sub.add_parser("demo", help="the whole product end to end on this machine, in minutes",
                        description="Make an uncurated bucket from images shipped in scikit-image/scikit-learn, "
                                    "build shards, pretrain on 2 DeepSpeed ranks with a queue, stop midway, resume, "
                                    "evaluate, and write a report.")
    dm.add_argument("--out", default="demo-output", help="where everything goes (default demo-output)")
    dm.add_argument("--steps", type=int, default=0, help="training steps (default: jobs/demo.yaml's train.steps)")
    dm.add_argument("--endpoint-url", default="", help="serve the bucket from this S3 endpoint instead of a folder")
    dm.add_argument("--fresh", action="store_true", help="delete previous demo output first")
    dm.add_argument("--seed", type=int, default=None, help="training seed (default: jobs/demo.yaml's)")
    dm.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of jobs/demo.yaml")
    dm.set_defaults(func=_demo)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    cp = sub.add_parser("compare", help="objectives x crop recipes x seeds at one budget, evaluated, in one table",
                        description="Train and evaluate every cell of a grid (resuming cells already done) and write "
                                    "OUT/table.md, OUT/table.json and OUT/table.png. With no GRID, the shipped "
                                    "jobs/compare/reviewers.yaml on the demo bucket.")
    cp.add_argument("grid", nargs="?", default="", metavar="GRID", help="grid YAML, or a shipped grid's name")
    cp.add_argument("--out", default="compare-output", help="where cells and the table go (default compare-output)")
    cp.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from swav.compare import run_compare

    run_compare(args.grid, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    # Overrides may come before or after flags (`pretrain CFG --dry-run a=1`): argparse alone stops
    # collecting positionals at the first flag.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command == "eval" and not args.eval_kind:
        parser.parse_args(["eval", "--help"])
    if args.debug:
        os.environ["SWAV_DEBUG"] = "1"  # the environment reaches ranks and workers started from here
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        if debug_enabled():
            print_cause(e)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
