"""The build's switches (CMakeLists.txt, scripts/build_wheel.sh), from a source checkout."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "CMakeLists.txt")),
                                reason="needs the source checkout (CMakeLists.txt)")


def _configure(tmp_path, value):
    pybind11 = pytest.importorskip("pybind11")
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH")
    return subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path / "build"), f"-DFASTCLIP_CUDA={value}",
                           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("value", ["off", "Off", "0", "false"])
def test_fastclip_cuda_is_read_in_any_case(value, tmp_path):
    """FASTCLIP_CUDA=off compiled the CUDA kernels (only "OFF" matched) and "on" quietly built a
    wheel without them."""
    out = _configure(tmp_path, value)
    assert out.returncode == 0, out.stderr
    assert "fastclip: CUDA kernels OFF (FASTCLIP_CUDA=OFF)" in out.stdout


def test_an_unknown_fastclip_cuda_stops_the_build(tmp_path):
    out = _configure(tmp_path, "bogus")
    assert out.returncode != 0 and "FASTCLIP_CUDA=bogus: expected AUTO, ON or OFF" in out.stderr
    script = subprocess.run(["bash", os.path.join(ROOT, "scripts", "build_wheel.sh")], cwd=tmp_path,
                            env={**os.environ, "FASTCLIP_CUDA": "maybe"}, capture_output=True, text=True,
                            timeout=60)
    assert script.returncode == 2 and "FASTCLIP_CUDA=maybe: expected AUTO, ON or OFF" in script.stderr
