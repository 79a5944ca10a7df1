"""What a user gets from `pip install .` (not editable): the wheel holds every subpackage and its data, and the
installed `qconv` answers from outside the repository."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the wheel installed (--no-deps; torch and the rest come from the system site), and the
    wheel's path."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=600)
    wheel = next((tmp / "dist").glob("qconv-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=600)
    return venv / "bin", wheel


def test_wheel_holds_the_package_and_no_tests_or_bench(installed):
    names = zipfile.ZipFile(installed[1]).namelist()
    package = {n for n in names if n.startswith("qconv/")}
    def ours(p: Path) -> bool:  # the package's own folders, not tests/, bench/, build output or hidden folders
        parts = p.relative_to(REPO).parts[:-1]
        return not ({"tests", "bench", "build"} & set(parts) or any(d.startswith(".") for d in parts))
    for sub in filter(ours, REPO.rglob("__init__.py")):
        assert f"qconv/{sub.relative_to(REPO).as_posix()}" in package, f"{sub} is not in the wheel"
    assert "qconv/calib_data/c4.jsonl.gz" in package and "qconv/runtime/serve/static/index.html" in package
    tables = list((REPO / "runtime/cuda/kernels/configs").glob("*.json"))  # the int4 kernel config tables
    assert tables and all(f"qconv/{t.relative_to(REPO).as_posix()}" in package for t in tables)
    assert not [n for n in package if n.startswith(("qconv/tests/", "qconv/bench/"))]


def test_installed_qconv_chats_from_outside_the_repository(installed, tiny_serve_ws, tmp_path):
    """As a CPU-only user gets it: triton (a test extra here) cannot be imported."""
    bin_dir, _ = installed
    blocked = tmp_path / "no-triton" / "triton"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('triton is not installed')\n")
    where = subprocess.run([str(bin_dir / "python"), "-c", "import qconv.runtime.engine, qconv; print(qconv.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(bin_dir.parent), "the editable checkout was imported"
    r = subprocess.run([str(bin_dir / "qconv"), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "qconv quantize" in r.stdout, r.stderr
    r = subprocess.run([str(bin_dir / "qconv"), "chat", str(tiny_serve_ws), "--prompt", "Hello",
                        "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(blocked.parent)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tok/s" in r.stderr, (r.stdout, r.stderr)
