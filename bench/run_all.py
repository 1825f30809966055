"""Run every benchmark script in bench/ (or those named on the command line), one after another.

Each script prints its figures and ratios and saves bench/results/<name>.json; this exits non-zero
if any script failed its correctness checks.
"""

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"__init__", "harness", "run_all", "bare_django"}


def main() -> int:
    names = sys.argv[1:] or sorted(
        path.stem
        for path in BENCH_DIR.glob("*.py")
        if path.stem not in NOT_BENCHMARKS and not path.stem.startswith("_")
    )
    failed = []
    for name in names:
        print(f"\n=== bench/{name}.py", flush=True)
        if subprocess.call([sys.executable, str(BENCH_DIR / f"{name}.py")], cwd=BENCH_DIR.parent):
            failed.append(name)
    print(
        f"\n{len(names) - len(failed)} passed, {len(failed)} failed"
        + (f": {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
