"""SUMMARY.md's tables from the JSON of the runs in this directory: medians (min-max) and the
matched ratios (2 workers ÷ 1 worker of the same server and loop; connected ÷ shared of the
same receiver, loop and peer count), each the median of per-repetition ratios."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

PAIRS = {"scale": (", 2 workers", ", 1 worker"), "scale_echo": (", 2 workers", ", 1 worker"),
         "connected": (", connected=True", ", shared socket"),
         "connected_admit": ("connected=True", "shared socket")}


def fmt(values: list[float], kind: str) -> str:
    def one(v: float) -> str:
        if kind == "percent":
            return f"{v * 100:.1f}%"
        if kind == "rate":
            return f"{v / 1e3:.0f}k" if v >= 1e3 else f"{v:.0f}"
        if kind == "mib":
            return f"{v / 2**20:.1f}"
        if kind in ("count", "bytes"):
            return f"{v:,.0f}"
        return f"{v:.3g}"
    if not values:
        return "—"
    med = one(statistics.median(values))
    return med if len(values) < 2 else f"{med} ({one(min(values))}–{one(max(values))})"


def ratio(mine: list[dict[str, float]], base: list[dict[str, float]], key: str) -> str:
    pairs = [a[key] / b[key] for a, b in zip(mine, base) if key in a and key in b and b[key] > 0]
    if not pairs:
        return "—"
    return f"{statistics.median(pairs):.2f}× ({min(pairs):.2f}–{max(pairs):.2f})"


def case_tables(case: dict[str, Any]) -> list[str]:
    metrics = case["metrics"]
    lines = [f"### {case['title']} — {case['size']} B", ""]
    head = ["peers", "configuration", "loop", *[m["label"] for m in metrics]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in case["rows"]:
        cells = [row["group"] or "-", row["name"], row["loop"]]
        for m in metrics:
            cells.append(fmt([s[m["key"]] for s in row["samples"] if m["key"] in s], m["kind"]))
        lines.append("| " + " | ".join(cells) + " |")
    mine_tag, base_tag = PAIRS[case["case"]]
    keys = [m["key"] for m in metrics if m["ratio"] or m["key"] in ("loss", "busy")]
    keys = [k for k in keys if k != "loss"]
    lines += ["", f"Matched ratios ({mine_tag.strip(', ')} ÷ {base_tag.strip(', ')}, same "
                  "server, loop and peers; median of per-repetition ratios):", ""]
    head = ["peers", "configuration", "loop", *keys]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in case["rows"]:
        if mine_tag not in row["name"]:
            continue
        base_name = row["name"].replace(mine_tag, base_tag)
        base = next((b for b in case["rows"] if b["name"] == base_name
                     and b["loop"] == row["loop"] and b["group"] == row["group"]), None)
        if base is None:
            continue
        cells = [row["group"] or "-", row["name"], row["loop"]]
        cells += [ratio(row["samples"], base["samples"], k) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"{r['name']} ({r['loop']}, {r['group'] or '-'}): {e.splitlines()[0]}"
              for r in case["rows"] for e in r["errors"]]
    if errors:
        lines += ["", *[f"- error: {e}" for e in errors]]
    return [*lines, ""]


def main(paths: list[str]) -> None:
    out: list[str] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        out.append(f"## {Path(path).name}: {data['mode']} run, {data['seconds'] / 60:.1f} min, "
                   f"udpx {data['machine'].get('git')}, reps {data['settings']['secondary_reps']}")
        out.append("")
        for case in data["cases"]:
            if case["case"] in PAIRS:
                out += case_tables(case)
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
