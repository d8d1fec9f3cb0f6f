"""Strength against optimisation steps on the trained testbeds, and what early stopping keeps.

For the default and AdvDM, the video effect (mean absolute difference to the clean photo's
video, as in `strength.py`, whose runs and cache it shares) at each step count, as a share
of the same method's effect at the most steps measured and as a ratio to AdvDM at 60
steps; and the default with early stopping (``--early-stop STEPS:PATIENCE``: at most STEPS
steps, stopping once PATIENCE steps gain nothing), with the steps it actually took. The
presets are chosen from this table (`fast` is 3 steps, `balanced` 5, `strong` 200:20).

    python benchmarks/steps.py                     # both testbeds, 2 prompts of CogVideoX
    python benchmarks/steps.py --testbeds cogvideox --steps 10,20,60 --early-stop 60:10

Writes ``benchmarks/results/steps.json`` and ``docs/results/steps.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import strength
from anti_i2v.atomic import write_atomic, write_json_atomic

BENCHMARKS = Path(__file__).resolve().parent
REFERENCE_STEPS = 60  # the yardstick: AdvDM at 60 steps


def curve(runs: list[dict], testbed: str, method: str) -> dict[int, dict[str, float]]:
    """Mean effect, seconds and steps actually taken of ``method`` on ``testbed``, per step count."""
    points: dict[int, list[dict]] = {}
    for r in runs:
        if r["testbed"] == testbed and r["method"] == method:
            points.setdefault(r["steps"], []).append(r)
    mean = lambda rows, key: sum(key(r) for r in rows) / len(rows)  # noqa: E731
    return {
        steps: {"mad": mean(rows, lambda r: r["mad"]), "seconds": mean(rows, lambda r: r["seconds"]),
                "steps_done": mean(rows, lambda r: r.get("steps_done", r["steps"])), "runs": len(rows)}
        for steps, rows in sorted(points.items())
    }


def curves(runs: list[dict], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per testbed and method: the curve, each point's share of its method's effect at the most
    steps (the plain method's, for an early-stopping variant such as ``anti-i2v:early_stop=10``)
    and its ratio to AdvDM at `REFERENCE_STEPS`."""
    table: dict[str, dict[str, Any]] = {}
    for testbed in dict.fromkeys(r["testbed"] for r in runs):
        reference = curve(runs, testbed, strength.BASELINE).get(REFERENCE_STEPS, {}).get("mad")
        for method in methods:
            points = curve(runs, testbed, method)
            if not points:
                continue
            plain = curve(runs, testbed, method.split(":")[0]) or points
            last = plain[max(plain)]["mad"]
            for point in points.values():
                point["share_of_most_steps"] = point["mad"] / last if last else None
                point["x_advdm_60"] = point["mad"] / reference if reference else None
            table.setdefault(testbed, {})[method] = points
    return table


def markdown(table: dict[str, dict[str, Any]], command: str) -> str:
    """The tables of docs/results/steps.md: one row per method and step count."""
    lines = ["# Strength against optimisation steps", "", f"Command: `{command}`", "",
             "Video MAD to the clean photo's video (as in strength.md), its share of the same method's MAD "
             "at the most steps (of the plain method's, for early-stopping rows), and the ratio to AdvDM at "
             f"{REFERENCE_STEPS} steps; early-stopping rows give the steps the runs actually took, in "
             "brackets. Seconds were measured with other benchmark processes sharing the CPU: compare steps.",
             ""]
    fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for testbed, methods in table.items():
        lines += [f"## {testbed}", "", "| method | steps (taken) | video MAD | share of most steps | "
                  f"x AdvDM@{REFERENCE_STEPS} | s/photo | runs |", "|---|---|---|---|---|---|---|"]
        for method, points in methods.items():
            for steps, p in points.items():
                taken = f"{steps} ({p['steps_done']:.0f})" if p["steps_done"] < steps else str(steps)
                lines.append(f"| `{method}` | {taken} | {p['mad']:.4f} | {fmt(p['share_of_most_steps'])} | "
                             f"{fmt(p['x_advdm_60'])} | {p['seconds']:.1f} | {p['runs']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbeds", default=",".join(strength.TESTBEDS))
    parser.add_argument("--steps", default="3,5,10,20,40,50,60,200")
    parser.add_argument("--early-stop", default="200:10,200:20",
                        help="STEPS:PATIENCE runs of the default with early stopping, comma-separated")
    parser.add_argument("--prompts", default="zoom in,pan left",
                        help="'all' or comma-separated; each testbed runs those it was trained on")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--out", default=str(BENCHMARKS / "results" / "steps.json"))
    parser.add_argument("--md", default=str(BENCHMARKS.parent / "docs" / "results" / "steps.md"))
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    stopping: dict[int, list[str]] = {}
    for item in (i for i in args.early_stop.split(",") if i):
        at, _, patience = item.partition(":")
        stopping.setdefault(int(at), []).append(f"anti-i2v:early_stop={patience}")
    methods = ["anti-i2v", strength.BASELINE]
    stopped = [spec for specs in stopping.values() for spec in specs]
    at_steps = [f"{n}={','.join(methods + stopping.get(n, []))}" for n in sorted(set(steps) | set(stopping))]
    document = strength.main([
        "--testbeds", args.testbeds, "--methods", ",".join(methods),
        "--steps", ",".join(str(n) for n in sorted(set(steps) | set(stopping))),
        *[arg for spec in at_steps for arg in ("--methods-at", spec)], "--prompts", args.prompts,
        "--battery", "", "--shard", args.shard, "--out", "", "--md", "",
    ])
    table = curves(document["runs"], methods + list(dict.fromkeys(stopped)))
    command = "python benchmarks/steps.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "curves": table}
    if args.shard == "0/1":
        write_json_atomic(Path(args.out), result)
        write_atomic(Path(args.md), lambda tmp: Path(tmp).write_text(markdown(table, command.strip())))
        print(markdown(table, command.strip()))
    return result


if __name__ == "__main__":
    main()
