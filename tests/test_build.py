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


_TYPES_CHECK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("triton_resources", sys.argv[1])
tr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tr)
seen = {}
tr._compile = lambda fn, sig, const, ints, cfg, arch: seen.setdefault(fn.__name__, sig)
tr.compile_bwd(tr.K._BWD_CONFIGS[0], "bf16", 1, False, True, 90)
tr.compile_fwd(tr.K._FWD_CONFIGS[0], "bf16", 1, 90)
tr.compile_merge(0, True, True, 90)
tr.compile_gemm(tr.KG._CONFIGS[0], "bf16", 1, True, 90)
for name, sig in sorted(seen.items()):
    bad = [a for a, t in sig.items() if a.endswith("_ptr") and not t.startswith("*")]
    print(name, "untyped pointers:", bad)
try:
    tr._signature(tr.K._fwd_kernel, {"*fp32": ("x_ptr",)})
except ValueError as e:
    print("refused:", e)
"""


def test_triton_resources_types_every_pointer_argument_of_every_kernel():
    """scripts/triton_resources.py typed each kernel's pointers from a hand-kept table whose
    default was i32: the forward's pos_ptr, added to the kernel later, compiled as an i32 and
    every forward configuration failed. Now a pointer the table misses is an error."""
    pytest.importorskip("triton")
    script = os.path.join(ROOT, "scripts", "triton_resources.py")
    out = subprocess.run([sys.executable, "-c", _TYPES_CHECK, script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:4] == [f"{k} untyped pointers: []" for k in
                         ("_bwd_kernel", "_col_merge_kernel", "_fwd_kernel", "_grad_tile_kernel")], out.stdout
    assert lines[4].startswith("refused: _fwd_kernel: pointer types out of date with the kernel's "
                               "arguments (untyped: y_ptr, rho_ptr"), out.stdout
