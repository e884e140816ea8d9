"""`make bench`: run every benchmark in this folder, one after another, and print results.

Benchmarks run one at a time so they do not compete for the two cores; each prints its own
figures (JSON or a table). Record the figures in docs/benchmarks.md.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        started = time.monotonic()
        module = f"bench.{script.stem}"
        result = subprocess.run([sys.executable, "-m", module], check=False, cwd=HERE.parent)
        print(f"== {script.name}: exit {result.returncode} in {time.monotonic() - started:.0f} s",
              flush=True)
        if result.returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
