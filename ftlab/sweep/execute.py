"""Running a planned sweep: every unfinished run as an ``ftlab fit`` subprocess, N at a time.

Each run writes into its own folder with its log (``sweep.log``) and ``sweep_point.json`` (command,
exit code, wall time, config fingerprint). W&B sees one group per grid point (``<sweep>/<point>``), the
run named ``<point> seed=<s>`` and tagged ``sweep``, the sweep's name and ``seed=<s>``, so W&B's grouped
view shows each point's mean and spread over seeds.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from ftlab.sweep.spec import Run, Sweep


def wandb_env(sweep: Sweep, run: Run, env: dict[str, str]) -> dict[str, str]:
    """W&B's own variables for ``run``: name, group (the grid point), job type and tags."""
    tags = [t for t in env.get("WANDB_TAGS", "").split(",") if t] + ["sweep", sweep.name[:64]]
    if run.seed is not None:
        tags.append(f"seed={run.seed}")
    return dict(
        env,
        WANDB_NAME=run.label[:128],
        WANDB_RUN_GROUP=f"{sweep.name}/{run.point.label}"[:128],
        WANDB_JOB_TYPE=sweep.name[:64],
        WANDB_TAGS=",".join(dict.fromkeys(tags)),
    )


def run(sweep: Sweep, parallel: int = 1) -> list[Run]:
    """Run every run that has not finished (see ``Sweep.finished``); return those that failed."""
    from ftlab.sweep.report import report

    runs = sweep.runs
    todo = []
    for r in runs:
        done = sweep.finished(r)
        if done:
            print(f"ftlab sweep: {r.label}: done, skipped ({done})", flush=True)
        else:
            if r.summary() is not None:
                print(f"ftlab sweep: {r.label}: its settings changed since it ran: running again", flush=True)
            todo.append(r)
    env = dict(os.environ)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    failed: list[Run] = []
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {
            pool.submit(_run_one, r, wandb_env(sweep, r, env), runs.index(r) + 1, len(runs)): r for r in todo
        }
        try:
            for future in as_completed(futures):
                if not future.result():
                    failed.append(futures[future])
                report(sweep)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    report(sweep)
    return failed


def _run_one(run: Run, env: dict[str, str], i: int, n: int) -> bool:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log = run.run_dir / "sweep.log"
    print(f"ftlab sweep: [{i}/{n}] {run.label}: running (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(shlex.join(run.command) + "\n\n")
        fh.flush()
        code = subprocess.call(run.command, stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    (run.run_dir / "sweep_point.json").write_text(
        json.dumps(
            {
                "label": run.label,
                "point": run.point.label,
                "seed": run.seed,
                "overrides": run.point.overrides,
                "returncode": code,
                "wall_s": round(wall, 1),
                "config_sha": run.config_sha,
                "command": run.command,
            },
            indent=2,
            default=str,
        )
    )
    if code == 0 and run.summary() is not None:
        print(f"ftlab sweep: [{i}/{n}] {run.label}: done in {wall:.0f} s", flush=True)
        return True
    tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
    print(
        f"ftlab sweep: [{i}/{n}] {run.label}: FAILED (exit {code}, no summary.json); end of {log}:\n{tail}",
        file=sys.stderr,
        flush=True,
    )
    return False
