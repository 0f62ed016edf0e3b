#!/usr/bin/env python3
"""Summarise an Autobahn-format report directory written by kosoku.

Usage: autobahn_summary.py REPORT_DIR [--cases "1.* 2.*"] [--exclude "12.* 13.*"]

Reads REPORT_DIR/index.json (and the per-case JSON files it points to for the
failures), prints a table per case group and every failing case with its
reason, and exits 1 if any case failed, if the report is missing or empty, if
a selected pattern matched no case, or if an excluded case was run.

Pass rule (Autobahn's convention, identical to kosoku's `CaseResult.passed`):
behavior in {OK, NON-STRICT, INFORMATIONAL} and behaviorClose in
{OK, INFORMATIONAL}.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from collections import Counter, defaultdict

PASS_BEHAVIOR = {"OK", "NON-STRICT", "INFORMATIONAL"}
PASS_CLOSE = {"OK", "INFORMATIONAL"}
MAX_LISTED = 40

GROUP_NAMES = {
    "1": "Framing",
    "2": "Pings/Pongs",
    "3": "Reserved Bits",
    "4": "Opcodes",
    "5": "Fragmentation",
    "6": "UTF-8 Handling",
    "7": "Close Handling",
    "9": "Limits/Performance",
    "10": "Misc",
    "12": "Compression (payloads)",
    "13": "Compression (parameters)",
}


def sort_key(case_id: str) -> list[int]:
    return [int(p) if p.isdigit() else 0 for p in case_id.split(".")]


def one_line(text: object, limit: int = 160) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report_dir")
    ap.add_argument("--cases", default="", help="space-separated include globs")
    ap.add_argument("--exclude", default="", help="space-separated exclude globs")
    args = ap.parse_args()

    index_path = os.path.join(args.report_dir, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except FileNotFoundError:
        print(f"autobahn: no report at {index_path} (kosoku did not finish)")
        return 1

    problems: list[str] = []
    failures: list[tuple[str, str, dict]] = []
    per_group: dict[str, Counter] = defaultdict(Counter)
    all_ids: set[str] = set()
    total_duration_ms = 0

    for agent, cases in index.items():
        for case_id, entry in cases.items():
            all_ids.add(case_id)
            group = case_id.split(".")[0]
            behavior = entry.get("behavior")
            close = entry.get("behaviorClose")
            total_duration_ms += int(entry.get("duration") or 0)
            ok = behavior in PASS_BEHAVIOR and close in PASS_CLOSE
            per_group[group]["cases"] += 1
            per_group[group][behavior if ok else "FAIL"] += 1
            if not ok:
                failures.append((agent, case_id, entry))

    agents = ", ".join(repr(a) for a in index) or "none"
    total = sum(c["cases"] for c in per_group.values())
    print(f"autobahn: server agent {agents}; {total} cases, "
          f"{total_duration_ms / 1000:.1f}s of case time")
    if total == 0:
        problems.append("the report has no cases")

    header = f"  {'group':<28} {'cases':>5} {'OK':>5} {'NONSTR':>6} {'INFO':>5} {'FAIL':>5}"
    print(header)
    for group in sorted(per_group, key=lambda g: int(g) if g.isdigit() else 0):
        c = per_group[group]
        name = f"{group} {GROUP_NAMES.get(group, '')}".strip()
        print(f"  {name:<28} {c['cases']:>5} {c['OK']:>5} {c['NON-STRICT']:>6} "
              f"{c['INFORMATIONAL']:>5} {c['FAIL']:>5}")

    # The selection must have done what we meant.
    for pattern in args.cases.split():
        if not any(fnmatch.fnmatchcase(i, pattern) for i in all_ids):
            problems.append(f"no case ran for selected pattern {pattern!r}")
    for pattern in args.exclude.split():
        ran = sorted((i for i in all_ids if fnmatch.fnmatchcase(i, pattern)), key=sort_key)
        if ran:
            problems.append(f"excluded pattern {pattern!r} ran: {', '.join(ran[:5])}")

    failures.sort(key=lambda f: sort_key(f[1]))
    if failures:
        print(f"autobahn: {len(failures)} failing case(s):")
    for agent, case_id, entry in failures[:MAX_LISTED]:
        detail: dict = {}
        report = entry.get("reportfile")
        if report:
            try:
                with open(os.path.join(args.report_dir, report)) as f:
                    detail = json.load(f)
            except (OSError, ValueError):
                pass
        print(f"  {case_id}: behavior={entry.get('behavior')} "
              f"close={entry.get('behaviorClose')} "
              f"remoteCloseCode={entry.get('remoteCloseCode')}")
        if detail:
            for label, key in (("case", "description"), ("expected", "expectation"),
                               ("result", "result")):
                if detail.get(key):
                    print(f"      {label + ':':<9} {one_line(detail[key])}")
            if detail.get("resultClose") and detail.get("resultClose") != detail.get("result"):
                print(f"      close:    {one_line(detail.get('resultClose'))}")
            if detail.get("remoteCloseReason"):
                print(f"      peer's close reason: {one_line(detail['remoteCloseReason'])}")
    if len(failures) > MAX_LISTED:
        print(f"  ... and {len(failures) - MAX_LISTED} more (see index.html)")

    for p in problems:
        print(f"autobahn: ERROR: {p}")

    # A plain closing line: N passed, N failed.
    print(f"autobahn: {total - len(failures)} passed, {len(failures)} failed")
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
