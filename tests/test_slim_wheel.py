"""bench/slim_wheel.py: the bitsandbytes wheel the GPU machine is carried keeps only the CPU and
CUDA 13.0 libraries, keeps its name, and stays a valid wheel pip installs (RECORD matches)."""

import base64
import csv
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm72", "xpu2026")


def digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(folder: Path) -> Path:
    """A wheel laid out as bitsandbytes 0.50's: one native library per toolkit beside the code."""
    files = {"bitsandbytes/__init__.py": b"__version__ = '0.50.2'\n"}
    files.update({f"bitsandbytes/libbitsandbytes_{flavour}.so": flavour.encode() * 4096 for flavour in LIBRARIES})
    info = "bitsandbytes-0.50.2.dist-info"
    files[f"{info}/METADATA"] = b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n"
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"
    record = "".join(f"{name},{digest(data)},{len(data)}\n" for name, data in files.items()) + f"{info}/RECORD,,\n"
    wheel = folder / "bitsandbytes-0.50.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", record)
    return wheel


def test_the_slim_wheel_keeps_cpu_and_cuda130_and_installs(tmp_path):
    wheel = write_wheel(tmp_path)
    out = tmp_path / "slim"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "slim_wheel.py"), str(wheel), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kept"] == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    assert len(report["dropped"]) == len(LIBRARIES) - 2
    assert report["size_after_bytes"] < report["size_before_bytes"]
    slim = out / wheel.name  # the same name: pip takes it as the same release
    with zipfile.ZipFile(slim) as archive:
        names = set(archive.namelist())
        record = list(csv.reader(io.StringIO(archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode())))
        # RECORD lists exactly the files left, each with its true hash and size.
        assert {row[0] for row in record} == names
        for name, hashed, size in record:
            if hashed:
                data = archive.read(name)
                assert (hashed, int(size)) == (digest(data), len(data)), name
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(slim)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr
    assert sorted(path.name for path in (target / "bitsandbytes").glob("*.so")) == report["kept"]


def test_a_wheel_left_without_a_cpu_library_is_refused(tmp_path):
    wheel = write_wheel(tmp_path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "slim_wheel.py"), str(wheel), "--keep", "cuda130"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "no CPU library" in result.stderr
    assert zipfile.ZipFile(wheel).namelist()  # the original untouched
    assert sorted(path.name for path in tmp_path.iterdir()) == [wheel.name]  # no half-written file left
