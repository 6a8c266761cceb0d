"""Slim the bitsandbytes wheel for the lent GPU machine's carry (64 MiB for the whole tree).

bitsandbytes ships one native library per CUDA/ROCm/XPU toolkit in one ~43 MB wheel; the lent
machine's torch is built with CUDA 13.0, and bitsandbytes loads the library of torch's CUDA
version, else the highest one below it of the same major (so cuda130 serves every 13.x), or the
CPU one without a GPU. Every other library is dropped, the wheel's RECORD rewritten to match,
and the wheel keeps its name, so pip installs it as the same release (43.1 MB -> 3.6 MB for
bitsandbytes 0.50.2).

    python bench/slim_wheel.py wheels/bitsandbytes-0.50.2-*.whl                 # in place
    python bench/slim_wheel.py WHEEL --keep cuda130 --keep cpu --out smaller/   # another folder

Prints one JSON line: the sizes before and after, and the libraries kept and dropped.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

NATIVE = re.compile(r"(^|/)libbitsandbytes_(?P<flavour>[a-z]+\d*)\.(so|dll|dylib)$")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="the bitsandbytes wheel")
    parser.add_argument(
        "--keep",
        action="append",
        default=None,
        help="library flavours kept, by prefix (default: cuda130 and cpu): libbitsandbytes_<flavour>.so",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for the slim wheel (default: replace in place)")
    return parser.parse_args(argv)


def kept(name: str, keep: tuple[str, ...]) -> bool:
    """Anything that is not a native library stays; a native library stays if its flavour
    (cuda130, cpu, rocm72 ...) starts with a kept prefix."""
    match = NATIVE.search(name)
    return match is None or match.group("flavour").startswith(keep)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(wheel: Path, keep: tuple[str, ...], out_dir: Path) -> dict:
    """Write the slim copy of `wheel` into out_dir under the same file name (atomically)."""
    dropped, libraries = [], []
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        record = next((name for name in names if name.endswith(".dist-info/RECORD")), None)
        if record is None:
            raise SystemExit(f"error: {wheel}: no .dist-info/RECORD, not a wheel")
        out_dir.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=out_dir, suffix=".whl.part")
        os.close(handle)
        lines = []
        try:
            with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as target:
                for info in source.infolist():
                    if info.filename == record:
                        continue
                    if not kept(info.filename, keep):
                        dropped.append(Path(info.filename).name)
                        continue
                    data = source.read(info)
                    if NATIVE.search(info.filename):
                        libraries.append(Path(info.filename).name)
                    target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                    lines.append(record_line(info.filename, data))
                # RECORD lists every file with its hash; its own line has none (the wheel spec).
                lines.append(f"{record},,")
                target.writestr(record, "\n".join(lines) + "\n")
            if not any(library.startswith("libbitsandbytes_cpu") for library in libraries):
                raise SystemExit(f"error: {wheel}: the slim wheel would have no CPU library (kept {libraries})")
            destination = out_dir / wheel.name
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from another user's pip
            os.replace(temporary, destination)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return {"wheel": wheel.name, "kept": sorted(libraries), "dropped": sorted(dropped), "destination": str(destination)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.wheel.is_file():
        print(f"error: {args.wheel}: no such wheel", file=sys.stderr)
        return 2
    keep = tuple(args.keep or ("cuda130", "cpu"))
    size_before = args.wheel.stat().st_size
    result = slim(args.wheel, keep, args.out or args.wheel.parent)
    result.update(size_before_bytes=size_before, size_after_bytes=Path(result["destination"]).stat().st_size)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
