"""`python -m bench [name ...]`: run the named benchmarks (default: all), one process each."""

import subprocess
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).parent
    names = sys.argv[1:] or sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))
    failed = 0
    for name in names:
        print(f"== bench/{name}.py", flush=True)
        failed += (
            subprocess.run([sys.executable, str(here / f"{name}.py")], check=False).returncode != 0
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
