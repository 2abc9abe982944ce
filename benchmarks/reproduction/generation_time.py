"""How long the generations of a `safeprune run` took, from its own records (eval/items.jsonl): each item
carries the wall time of the batch it was generated in and the batch size, so sum(batch_seconds /
batch_size) is the generation wall time a cold run spends, whichever run (or restarted run) produced the
cached generations. Prints per variant and per set, and the total.

    python benchmarks/reproduction/generation_time.py OUT_DIR [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    per: dict[tuple[str, str], float] = collections.defaultdict(float)
    n: dict[tuple[str, str], int] = collections.defaultdict(int)
    with open(a.out_dir / "eval" / "items.jsonl", encoding="utf-8") as f:
        for line in f:
            it = json.loads(line)
            per[it["variant"], it["set"]] += it["latency_s"] / max(1, it["batch_size"])
            n[it["variant"], it["set"]] += 1
    total = sum(per.values())
    by_set: dict[str, float] = collections.defaultdict(float)
    for (v, s), t in per.items():
        by_set[s] += t
    variants = sorted({v for v, _ in per})
    print(
        f"{len(variants)} variants, {sum(n.values())} generations: {total:.0f} s of generation wall time "
        f"({total / 60:.1f} min)"
    )
    for s, t in by_set.items():
        print(f"  {s}: {t:.0f} s")
    for v in variants:
        print(f"  {v}: {sum(t for (vv, _), t in per.items() if vv == v):.0f} s")
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "total_s": total,
                    "by_set_s": by_set,
                    "variants": len(variants),
                    "per_variant_s": {v: sum(t for (vv, _), t in per.items() if vv == v) for v in variants},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
