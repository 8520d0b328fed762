"""Compare conformance runs: every test the baseline passes must pass with the router.

Usage: python .ci/compare_conformance.py baseline.xml variant.xml [variant.xml ...]
Prints passed/skipped/failed counts per run and exits 1 if a variant fails a test
that the baseline passes.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter


def outcomes(path: str) -> dict[str, str]:
    out = {}
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out[name] = ("failed" if kinds & {"failure", "error"}
                     else "skipped" if "skipped" in kinds else "passed")
    return out


def main(baseline: str, *variants: str) -> int:
    base = outcomes(baseline)
    passed = {t for t, o in base.items() if o == "passed"}
    status = 0
    print(f"{'run':<40} {'passed':>7} {'skipped':>8} {'failed':>7}")
    for path in (baseline, *variants):
        got = outcomes(path)
        counts = Counter(got.values())
        print(f"{path:<40} {counts['passed']:>7} {counts['skipped']:>8} {counts['failed']:>7}")
        if path == baseline:
            continue
        broken = sorted(t for t in passed if got.get(t) != "passed")
        for test in broken:
            print(f"  BREAK {test}: {got.get(test, 'missing')} (baseline: passed)")
        status |= bool(broken)
    return status


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
