"""Run the benchmarks: ``python -m benchmarks.run --smoke|--quick|--full [--only NAME,...]``.

Prints one JSON line per benchmark; exits 1 when any benchmark raised. ``--smoke`` runs
every benchmark at tiny sizes (about a minute; CI runs it) to show that each one runs.
``--full`` without ``--only`` also writes
``benchmarks/results/latest.json`` and ``benchmarks/results/latest.png``. A new
benchmark module is imported here (``MODULES``) so that its ``@benchmark`` functions
register; see :mod:`benchmarks.framework` for how to write one.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from benchmarks.framework import REGISTRY, Context, write_chart, write_results

MODULES = [
    "benchmarks.ingest",
    "benchmarks.earn",
    "benchmarks.accounts",
    "benchmarks.expiry",
    "benchmarks.storage",
    "benchmarks.member_load",
    "benchmarks.delivery",
    "benchmarks.durable_growth",
    "benchmarks.reporting",
    "benchmarks.dryrun",
    "benchmarks.currency_expiry",
    "benchmarks.console",
    "benchmarks.scale_out",
    "benchmarks.jetstream",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, every benchmark in about a minute: checks they run (CI), no targets",
    )
    size.add_argument("--quick", action="store_true", help="small sizes (default)")
    size.add_argument("--full", action="store_true", help="full sizes, write results/")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    for module in MODULES:
        importlib.import_module(module)
    ordered = sorted(REGISTRY.values(), key=lambda r: (r.order, r.name))
    if args.list:
        for reg in ordered:
            print(f"{reg.name:28} {reg.description}")
        return 0
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; see --list")
    ctx = Context(mode="full" if args.full else "smoke" if args.smoke else "quick")
    try:
        for reg in ordered:
            if not wanted or reg.name in wanted:
                ctx.run_one(reg.name)
    finally:
        ctx.close()
    results = [ctx.results[r.name] for r in ordered if r.name in ctx.results]
    if args.full and wanted:
        print("not writing results/: --only ran a subset", file=sys.stderr)
    elif args.full:
        print(f"wrote {write_results(results, ctx.mode)}", file=sys.stderr)
        try:
            print(f"wrote {write_chart(results)}", file=sys.stderr)
        except RuntimeError as exc:
            print(f"no chart: {exc}", file=sys.stderr)
            return 1
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
