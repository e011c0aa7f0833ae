"""`omni-edge verify BUNDLE`: check every file of an edge bundle against its manifest, sha256 included.

Loading a bundle checks sizes, tensor tables and the small files' hashes only (fast); `verify` also hashes
the weight files, so a bundle edited after it was written (a scale set to +inf, a flipped byte) is found.
Prints one line per file; exit code 0 when every file matches, 1 when one does not, 2 when the folder is not
a readable bundle.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="edge bundle folder (written by omni-edge quantize)")
    p.add_argument("--quiet", action="store_true", help="print only problems and the verdict")


def run(args) -> int:
    import time

    from omni_edge import bundle
    from omni_edge.cli import CliError

    t0 = time.time()
    try:
        result = bundle.verify(args.bundle)
    except (OSError, ValueError) as e:
        raise CliError(" ".join(str(e).split())) from None
    total = 0
    for row in result["files"]:
        total += row["bytes"]
        if row["status"] != "ok" or not args.quiet:
            detail = f"  ({row['detail']})" if row["detail"] else ""
            print(f"{row['status']:9s} {row['file']}{detail}")
    if result["structure"] != "ok":
        print(f"PROBLEM   {result['structure']}")
    for name in result["unlisted"]:
        print(f"note      {name} is in the folder but not in the manifest (not used by the runtime)")
    secs = time.time() - t0
    if result["ok"]:
        print(f"bundle {args.bundle}: OK ({len(result['files'])} files, {total / 2**20:,.1f} MiB hashed "
              f"in {secs:.1f} s)")
        return 0
    bad = sum(r["status"] != "ok" for r in result["files"]) + (result["structure"] != "ok")
    print(f"bundle {args.bundle}: FAILED ({bad} problem(s)); re-create it with omni-edge quantize",
          file=sys.stdout)
    return 1
