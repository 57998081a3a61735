"""`alma-r setup` (work pools and the `gpu` concurrency limit on the Prefect server) and `alma-r prune-cache`
(old stage cache records, and the outputs of earlier keys that runs set aside in `<run>/.superseded/`)."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

WORK_POOLS = {"cpu-process": "process"}  # the GPU pool's type is chosen by --gpu-pool-type


def add_orchestration_parsers(sub) -> None:
    setup = sub.add_parser("setup", help="create the work pools and the `gpu` concurrency limit (idempotent)")
    setup.add_argument("--gpus", type=int, default=1, help="slots of the `gpu` limit: GPU stages at once (1)")
    setup.add_argument("--gpu-limit", default="gpu", help="name of the global concurrency limit (gpu)")
    setup.add_argument(
        "--gpu-pool-type",
        default="process",
        choices=["process", "docker", "kubernetes"],
        help="type of the `gpu` work pool (docs/deployment.md has GPU job templates for docker/kubernetes)",
    )
    setup.set_defaults(handler=run_setup)
    prune = sub.add_parser(
        "prune-cache",
        help="delete stage cache records, and outputs set aside in <run>/.superseded/, older than N days",
    )
    prune.add_argument("--older-than-days", type=float, required=True, help="age threshold in days")
    prune.add_argument("--storage", type=Path, default=None, help="result storage folder (Prefect's default)")
    prune.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="folder of run folders (run.root) whose set-aside outputs go",
    )
    prune.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    prune.set_defaults(handler=run_prune)


def run_setup(args: argparse.Namespace) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    pools = {**WORK_POOLS, "gpu": args.gpu_pool_type}
    with get_client(sync_client=True) as client:
        for name, kind in pools.items():
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=kind))
                print(f"work pool {name!r} ({kind}) created")
            except ObjectAlreadyExists:
                print(f"work pool {name!r} exists")
        try:
            limit = client.read_global_concurrency_limit_by_name(args.gpu_limit)
            print(f"concurrency limit {args.gpu_limit!r} exists ({limit.limit} slots)")
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=args.gpu_limit, limit=args.gpus)
            )
            print(f"concurrency limit {args.gpu_limit!r} created ({args.gpus} slots)")
    return 0


def stage_records(storage: Path) -> list[Path]:
    """The cache records of alma-r stages (tasks/runtime/prefect_stage.py names their keys `alma-r-<stage>-...`)."""
    return sorted(p for p in storage.glob("alma-r-*") if p.is_file())


def superseded_folders(runs: Path) -> list[Path]:
    """What runs under `runs` set aside when a stage's key changed (tasks/runtime/stage.py::set_aside)."""
    from alma_r.data.files import SUPERSEDED

    return sorted(p for p in runs.glob(f"**/{SUPERSEDED}/*") if p.is_dir())


def run_prune(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    storage = Path(args.storage or PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()).expanduser()
    cutoff = time.time() - args.older_than_days * 86400
    records = stage_records(storage)
    old = [p for p in records if p.stat().st_mtime < cutoff]
    aside = superseded_folders(args.runs)
    old_aside = [p for p in aside if p.stat().st_mtime < cutoff]
    for path in old:
        if not args.dry_run:
            path.unlink(missing_ok=True)
    for folder in old_aside:
        if not args.dry_run:
            shutil.rmtree(folder)
            forget_superseded(folder)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{verb} {len(old)} of {len(records)} stage cache records in {storage} and {len(old_aside)} of "
        f"{len(aside)} set-aside output folders under {args.runs} older than {args.older_than_days:g} days"
    )
    return 0


def forget_superseded(folder: Path) -> None:
    """Drop a deleted folder's line from its .superseded/index.jsonl."""
    index = folder.parent / "index.jsonl"
    if not index.is_file():
        return
    lines = [line for line in index.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("path") != str(folder)]
    tmp = index.with_name(".index.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(index)
