"""Compare two output folders of run.sh: every file byte for byte, except JSON (timing fields and the
manifest's timestamp/command line dropped) and captured stdout/stderr (the folder path replaced)."""

import json
import sys
from pathlib import Path

DROP = {"seconds", "read_seconds", "created", "command_line", "threads", "parallel_modules"}


def norm(o):
    if isinstance(o, dict):
        return {k: norm(v) for k, v in o.items() if k not in DROP}
    if isinstance(o, list):
        return [norm(x) for x in o]
    return o


def same(a: Path, b: Path, rel: Path, root_a: Path, root_b: Path) -> bool:
    da, db = a.read_bytes(), b.read_bytes()
    if da == db:
        return True
    if rel.suffix == ".json":
        try:
            return norm(json.loads(da)) == norm(json.loads(db))
        except ValueError:
            return False
    if rel.suffix in (".stdout", ".stderr"):
        return da.decode().replace(str(root_a), "X") == db.decode().replace(str(root_b), "X")
    return False


def main(a: Path, b: Path) -> int:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    bad = 0
    if fa != fb:
        print("file sets differ:", sorted(set(fa) ^ set(fb)))
        bad += 1
    for rel in fa:
        if (b / rel).exists() and not same(a / rel, b / rel, rel, a, b):
            print("DIFF", rel)
            bad += 1
    print("compared", len(fa), "files;", bad, "differences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
