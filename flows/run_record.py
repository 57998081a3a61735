"""run.json: what a run did, stage by stage (status, cached, seconds, outputs, counts), rewritten atomically
after every stage so that a crash leaves an accurate record of the finished work; `hub` lists every Hub
repository the stages resolved (id, revision, commit). A failed run records its
failure: the stage, the kind (config, input_data, resource, out_of_memory, ...; tasks/runtime/failures.py), the
exit status of `alma-r` and the one-line message."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from alma_r import __version__
from alma_r.data.files import write_json_atomic
from alma_r.tasks.runtime.failures import classify
from alma_r.tasks.runtime.stage import StageResult, code_version


class RunRecord:
    def __init__(
        self,
        run_dir: Path,
        config_path: str | None,
        overrides: list[str],
        config: dict,
        flow: str | None = None,
        flow_module: str = "alma_r.flows.build_alma_r",
    ):
        """`flow`: the flow's name, recorded when given; `flow_module`: whose code (and the alma_r modules it
        imports) `code_version` fingerprints."""
        self.path = Path(run_dir) / "run.json"
        self.data = {
            "run": Path(run_dir).name,
            "run_dir": str(run_dir),
            "config_path": config_path,
            "overrides": overrides,
            "alma_r_version": __version__,
            "code_version": code_version(flow_module),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "finished": None,
            "status": "running",
            "stages": {},
            "hub": [],
            "config": config,
        }
        if flow is not None:
            self.data["flow"] = flow
        self.save()

    def stage_done(self, result: StageResult):
        self.data["stages"][result.stage] = {
            "status": "completed",
            "cached": result.cached,
            "seconds": result.seconds,
            "outputs": result.outputs,
            "counts": result.counts,
        }
        if result.superseded:  # earlier outputs this run moved aside instead of deleting them
            self.data["stages"][result.stage]["superseded"] = result.superseded
            self.data.setdefault("superseded", []).extend(result.superseded)
        if result.resumed:
            self.data["stages"][result.stage]["resumed_under_new_code"] = result.resumed
        self._add_hub(result.counts.get("resolved", []))
        self.save()

    def _add_hub(self, snapshots: list[dict]) -> None:
        """Every Hub repository a stage resolved (its counts' `resolved`), once per id and revision asked, with
        the commit it resolved to: what the run used, in one list."""
        hub = self.data["hub"]
        known = {(h["repo_type"], h["repo_id"], h["revision"]) for h in hub}
        for snapshot in snapshots:
            which = (snapshot["repo_type"], snapshot["repo_id"], snapshot["revision"])
            if which not in known:
                known.add(which)
                hub.append(snapshot)

    def stage_failed(self, stage: str, error: BaseException):
        failure = classify(error)
        self.data["stages"][stage] = {
            "status": "failed",
            "cached": False,
            "error": f"{type(error).__name__}: {error}",
            "kind": failure.kind,
        }
        self.data["failure"] = {**failure.to_json(), "stage": stage}
        self.finish("failed")

    def finish(self, status: str = "completed"):
        self.data["status"] = status
        self.data["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.save()

    def save(self):
        write_json_atomic(self.path, self.data)
