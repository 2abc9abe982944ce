"""Do two runs of the same study report the same numbers? Compares every metric of every variant and set in
two ``safeprune run`` (or ``safeprune eval``) output folders' ``eval/results.json`` (timing fields aside) and
prints the differences; exit 1 if any metric differs by more than ``--tol``.

    python benchmarks/reproduction/same_metrics.py benchmarks/reproduction/testbed NEW_RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIMING = {"tokens_per_s", "mean_latency_s", "generated_now", "mean_new_tokens", "stopped_early"}


def _metrics(run: Path) -> dict:
    p = run / "eval" / "results.json" if (run / "eval").is_dir() else run / "results.json"
    return json.loads(p.read_text(encoding="utf-8"))["metrics"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--tol", type=float, default=1e-9)
    a = ap.parse_args()
    old, new = _metrics(a.old), _metrics(a.new)
    compared, diffs, one_side = 0, [], set()
    for variant in sorted(set(old) | set(new)):
        if variant not in old or variant not in new:
            diffs.append(f"{variant}: only in {'old' if variant in old else 'new'}")
            continue
        for s in sorted(set(old[variant]) | set(new[variant])):
            o, n = old[variant].get(s, {}), new[variant].get(s, {})
            for k in sorted((set(o) | set(n)) - TIMING):
                if (k in o) != (k in n):  # a metric one version of the tool does not report
                    one_side.add(f"{s} / {k} only in {'old' if k in o else 'new'}")
                    continue
                ov, nv = o[k], n[k]
                if not isinstance(ov, (int, float)) or not isinstance(nv, (int, float)):
                    if ov != nv:
                        diffs.append(f"{variant} / {s} / {k}: {ov!r} → {nv!r}")
                    continue
                compared += 1
                if abs(ov - nv) > a.tol:
                    diffs.append(f"{variant} / {s} / {k}: {ov:.6g} → {nv:.6g}")
    print(f"{compared} metrics compared over {len(set(old) & set(new))} variants; {len(diffs)} differ")
    for d in diffs:
        print("  " + d)
    if one_side:
        print("not compared (reported by one run only): " + "; ".join(sorted(one_side)))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
