"""Profile the ingest path under load with py-spy (not part of the benchmark run).

    .venv/bin/pip install py-spy
    .venv/bin/python -m benchmarks.profile_ingest [--events 200000] [--server uvicorn]

Starts the servers on a fresh database, samples every server process with
``py-spy record --format raw`` while the load generator runs, and prints the functions
with the most inclusive and self samples (the raw stacks are kept in the temp folder).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import cpu, loadgen, servers
from benchmarks.framework import Context
from benchmarks.ingest_load import BATCH, CLIENTS, SOURCE, Workload, ensure_partitions
from loyalty.application.access import Role


def summarize(stacks: list[Path], top: int) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for path in stacks:
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [f.rsplit(" (", 1)[0] + " " + f.rsplit("/", 1)[-1] for f in stack.split(";")]
            total += count
            for frame in set(frames):
                inclusive[frame] += count
            self_[frames[-1]] += count
    print(f"{total} samples")
    for title, counter in (("inclusive", inclusive), ("self", self_)):
        print(f"\n-- top {top} {title} --")
        for frame, count in counter.most_common(top):
            print(f"{100 * count / max(total, 1):5.1f}%  {frame[:150]}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--server", default="uvicorn", choices=servers.SERVERS)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--idle", action="store_true", help="include idle samples")
    parser.add_argument("--gil", action="store_true", help="only threads holding the GIL")
    args = parser.parse_args()
    if shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None:
        print("install py-spy into the venv first", file=sys.stderr)
        return 2
    ctx = Context(mode="quick")
    try:
        url = ctx.pg_url
        wl = Workload(n_events=args.events, now=datetime.now(UTC), prefix="prof")
        ensure_partitions(url, wl)
        key = ctx.create_key(Role.INGEST, SOURCE)
        spy = str(Path(sys.executable).parent / "py-spy")
        with servers.serve(url, kind=args.server, processes=2) as running:
            pids = running.pids  # granian: sample its worker processes, not the manager
            if args.server == "granian":
                pids = [p for p in cpu.tree(running.pids) if p not in running.pids]
            spec = loadgen.LoadSpec(
                ports=running.ports,
                key=key,
                clients=CLIENTS,
                n_events=wl.n_events,
                batch_size=BATCH,
                seed=wl.seed,
                now=wl.now,
                prefix=wl.prefix,
                time_limit=120,
            )
            load = loadgen.LoadProcess(spec).start()
            outs = [ctx.tmp_dir / f"stacks-{pid}.txt" for pid in pids]
            spies = [
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--format",
                        "raw",
                        "--rate",
                        "200",
                        "--duration",
                        "60",
                        "--output",
                        str(out),
                        "--nonblocking",
                    ]
                    + (["--idle"] if args.idle else [])
                    + (["--gil"] if args.gil else []),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for pid, out in zip(pids, outs, strict=True)
            ]
            result = load.result()
            for s in spies:
                s.send_signal(2)  # SIGINT: py-spy writes what it has
            for s in spies:
                s.wait(timeout=30)
        rate = result["accepted"] / result["elapsed_s"]
        print(f"{rate:,.0f} events/s (while sampled), errors {result['errors']}")
        summarize([o for o in outs if o.exists()], args.top)
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
