"""`python -m engine.kernels build`: prebuild the kernels for every instruction-set level
(engine.kernels.VARIANTS), as the Docker image does; `which`: the library this CPU would load."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from engine import kernels
from engine.kernels.build import LIBRARY_NAME, PREBUILT_DIR, VARIANTS, build_many, choose_prebuilt, prebuilt_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="compile the prebuilt libraries (needs g++, not their CPUs)")
    build_cmd.add_argument(
        "--variant", action="append", choices=[variant.name for variant in VARIANTS],
        help="only this one (repeatable); all by default",
    )  # fmt: skip
    build_cmd.add_argument("--dir", type=Path, default=PREBUILT_DIR, help=f"where to put them (default {PREBUILT_DIR})")
    commands.add_parser("which", help="print the library this CPU would load, and exit 1 if it has to build one")
    args = parser.parse_args(argv)

    if args.command == "which":
        prebuilt, why_not = choose_prebuilt(kernels.cpu_flags())
        if prebuilt is not None:
            print(f"prebuilt {prebuilt}")
            return 0
        library = kernels.library_path()
        print(f"{'built' if library.exists() else 'to build'} {library}" + (f" ({why_not})" if why_not else ""))
        return 0 if library.exists() else 1

    if platform.machine() not in ("x86_64", "AMD64"):  # the variants are x86-64 levels
        print(f"no prebuilt kernels for {platform.machine()}: the server builds its own where a compiler is",
              file=sys.stderr)  # fmt: skip
        return 0
    variants = [variant for variant in VARIANTS if not args.variant or variant.name in args.variant]
    jobs = [(prebuilt_path(variant, args.dir), variant.flags) for variant in variants]
    started = time.monotonic()
    try:
        build_many(jobs)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    kept = {library for library, _ in jobs}
    for variant in variants:  # older builds of the same variants
        for old in args.dir.glob(f"{LIBRARY_NAME}-{variant.name}-*.so"):
            if old not in kept:
                old.unlink()
    for library, flags in jobs:
        print(f"{library}  ({' '.join(flags)})")
    print(f"built {len(jobs)} libraries in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
