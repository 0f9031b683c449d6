"""Print ``benchmarks/results/latest.json`` as a Markdown table (for the README):
``python -m benchmarks.table [path]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.framework import RESULTS_DIR


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "| benchmark | value | unit | baseline | baseline value | ratio | target | met "
        "| cpu_other |",
        "|---|---:|---|---|---:|---:|---|---|---:|",
    ]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} | | | | | | | |")
            continue
        lines.append(
            "| {name} | {value} | {unit} | {baseline} | {bvalue} | {ratio} | {target} | {met} "
            "| {other} |".format(
                name=r["name"],
                value=_num(r.get("value")),
                unit=r.get("unit") or "—",
                baseline=r.get("baseline") or "—",
                bvalue=_num(r.get("baseline_value")),
                ratio=_num(r.get("ratio")),
                target=f"`{r['target']}`" if r.get("target") else "report",
                met={True: "yes", False: "**no**"}.get(r.get("met"), "—"),
                other=_num(r.get("cpu_other")),
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else RESULTS_DIR / "latest.json"
    doc = json.loads(path.read_text())
    print(f"{doc['mode']} run at {doc['at']}, {doc['cpus']} CPUs, Python {doc['python']}\n")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
