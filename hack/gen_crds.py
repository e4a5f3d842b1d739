#!/usr/bin/env python3
"""Write the CRDs generated from the pydantic models into crds/ and the chart's crds/.

python hack/gen_crds.py           write the files
python hack/gen_crds.py --check   exit 1 if a file differs from what the models generate
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tierwise.crdgen import all_crds, render

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [ROOT / "crds", ROOT / "charts" / "tierwise" / "crds"]


def expected() -> dict[Path, str]:
    return {folder / name: render(crd) for folder in TARGETS for name, crd in all_crds().items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report drift instead of writing")
    args = parser.parse_args()
    drift = [p for p, text in expected().items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in drift:
            print(f"drift: {p.relative_to(ROOT)} differs from the models; run python hack/gen_crds.py", file=sys.stderr)
        return 1 if drift else 0
    for p in drift:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(expected()[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
