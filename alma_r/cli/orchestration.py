"""`alma-r setup` (work pools and the `gpu` concurrency limit on the Prefect server) and `alma-r prune-cache`
(old stage cache records)."""

from __future__ import annotations

import argparse
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
    prune = sub.add_parser("prune-cache", help="delete stage cache records older than N days")
    prune.add_argument("--older-than-days", type=float, required=True, help="age threshold in days")
    prune.add_argument("--storage", type=Path, default=None, help="result storage folder (Prefect's default)")
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


def run_prune(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    storage = Path(args.storage or PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()).expanduser()
    cutoff = time.time() - args.older_than_days * 86400
    old = [p for p in stage_records(storage) if p.stat().st_mtime < cutoff]
    for path in old:
        if not args.dry_run:
            path.unlink(missing_ok=True)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{verb} {len(old)} of {len(stage_records(storage)) + (0 if args.dry_run else len(old))} stage cache "
        f"records in {storage} older than {args.older_than_days:g} days"
    )
    return 0
