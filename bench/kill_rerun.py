"""Kill the pipeline at many moments, re-run it each time, and check that nothing was lost.

    python bench/kill_rerun.py                       # 20 kills at seeded random moments (about 6 min)
    python bench/kill_rerun.py --kills 40 --seed 3   # more
    python bench/kill_rerun.py --json result.json

What it does: one uninterrupted `mlxflow run pipeline --config configs/smoke.yaml` into its own
out dir (the reference). Then rounds, each in a new out dir: the same command, SIGKILLed (the
whole process group: the flow and its training children) at a moment drawn uniformly at random
(seeded) from 0.5 s to the reference's wall time, then re-run and killed again at a new moment,
until a run ends by itself (a moment after its end); the round's run must then have exited 0,
its pretrain and sft weights (model.safetensors) must be byte-identical to the reference's, and
no `.tmp-*` file or dir may be left anywhere under its out dir. Rounds go on until --kills kills.
Runs rotate through three Prefect set-ups: the same Prefect home and server, a fresh
PREFECT_HOME (an empty result store: Prefect remembers nothing), and the CLI's own temporary
server.

The suite's deterministic version (kills at named milestones of every stage, including right
after a stage's output is finalized) is tests/flows/test_kill_rerun.py; both use `run_pipeline`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SMOKE = REPO / "configs" / "smoke.yaml"


def run_pipeline(out_dir: Path, env: dict, *, kill_when: Callable[[Path], bool] | None = None,
                 kill_after_s: float | None = None, config: Path = SMOKE, timeout: float = 600,
                 log: Path | None = None) -> dict:
    """`mlxflow run pipeline --config CONFIG --set out_dir=OUT_DIR` in its own process group.

    SIGKILLs the group as soon as `kill_when(out_dir)` is true (polled every 5 ms) or after
    `kill_after_s`. Returns {"killed": bool, "rc": exit code, "seconds": wall time}.
    """
    cmd = [sys.executable, "-m", "flows.cli", "run", "pipeline", "--config", str(config), "--set", f"out_dir={out_dir}"]
    out = open(log, "ab") if log else subprocess.DEVNULL
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    killed = False
    try:
        while proc.poll() is None:
            now = time.monotonic() - start
            if (kill_after_s is not None and now >= kill_after_s) or (kill_when is not None and kill_when(out_dir)):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            if now > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError(f"{' '.join(cmd)} ran over {timeout:.0f} s")
            time.sleep(0.005)
        rc = proc.wait()
    finally:
        if log:
            out.close()
    return {"killed": killed, "rc": rc, "seconds": time.monotonic() - start}


def weights(out_dir: Path) -> dict[str, str]:
    """sha256 of each training stage's final model.safetensors, by stage."""
    found = {}
    for path in sorted(Path(out_dir).glob("*/*/model/model.safetensors")):
        found[path.parent.parent.name.split("-")[0]] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def leftover_tmp(out_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(out_dir)) for p in Path(out_dir).rglob(".tmp-*"))


def prefect_envs(api_url: str | None, work: Path):
    """Endless rotation of Prefect set-ups for re-runs: same home + server, fresh home, own temp server."""
    base = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO)}
    home = work / "prefect-home"
    i = 0
    while True:
        kind = ("same home", "fresh home", "temporary server")[i % 3] if api_url else ("same home", "fresh home")[i % 2]
        env = {**base, "PREFECT_HOME": str(home)}
        if kind == "fresh home":
            env["PREFECT_HOME"] = tempfile.mkdtemp(prefix="home-", dir=work)
        if kind == "temporary server":
            env.pop("PREFECT_API_URL", None)
        elif api_url:
            env["PREFECT_API_URL"] = api_url
        yield kind, env
        i += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=Path, default=SMOKE)
    ap.add_argument("--work", type=Path, default=None, help="default: a new temp dir (removed at the end)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from tests.conftest import stop_group
    from tests.prefect_ui import start_prefect_server

    work = args.work or Path(tempfile.mkdtemp(prefix="kill-rerun-"))
    work.mkdir(parents=True, exist_ok=True)
    base, server = start_prefect_server(work / "server-home")
    try:
        envs = prefect_envs(f"{base}/api", work)
        _, env = next(envs)
        ref = run_pipeline(work / "reference", env, config=args.config, log=work / "reference.log")
        if ref["rc"] != 0:
            print(f"the reference run failed (exit {ref['rc']}); see {work / 'reference.log'}")
            return 1
        rng = random.Random(args.seed)
        print(f"reference: {ref['seconds']:.1f} s; kill moments drawn from U(0.5, {ref['seconds']:.1f}) s (seed {args.seed})")
        runs, rounds = [], []
        while sum(r["killed"] for r in runs) < args.kills:  # a round: kill, re-run, ... until a run completes
            out = work / f"round-{len(rounds) + 1:02d}"
            while True:
                kind, env = next(envs)
                at = rng.uniform(0.5, ref["seconds"]) if sum(r["killed"] for r in runs) < args.kills else None
                r = run_pipeline(out, env, kill_after_s=at, config=args.config, log=work / "killed.log")
                runs.append(r | {"prefect": kind, "kill_at_s": at, "round": len(rounds) + 1})
                print(f"round {len(rounds) + 1} run {len(runs):2d} ({kind:16s}) " + (
                    f"killed at {at:5.1f} s" if r["killed"] else f"exit {r['rc']} after {r['seconds']:5.1f} s"))
                if not r["killed"]:
                    break
            left = leftover_tmp(out)
            rounds.append({"rc": r["rc"], "identical_weights": weights(out) == weights(work / "reference"),
                           "stages": sorted(weights(out)), "leftover_tmp": left})
            if r["rc"] != 0:
                break
        result = {"kills": sum(r["killed"] for r in runs), "runs": len(runs), "rounds": rounds,
                  "reference_s": ref["seconds"], "failed_runs": sum(1 for r in runs if not r["killed"] and r["rc"]),
                  "runs_detail": runs}
        ok = (not result["failed_runs"] and all(x["identical_weights"] and x["stages"] == ["pretrain", "sft"]
                                                and not x["leftover_tmp"] for x in rounds))
        print(f"\n{result['kills']} kills in {len(rounds)} rounds ({result['runs']} runs): failed runs "
              f"{result['failed_runs']}, rounds with weights identical to the uninterrupted run "
              f"{sum(x['identical_weights'] for x in rounds)}/{len(rounds)}, temp files left "
              f"{sum(len(x['leftover_tmp']) for x in rounds)}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0 if ok else 1
    finally:
        stop_group(server)


if __name__ == "__main__":
    sys.exit(main())
