"""Smoke tests of the contrastive-loss benchmark harness (fastclip.bench).

Tiny sizes and one repetition: these check that a run produces complete, consistent
CSV / markdown / PNG output, that memory-hungry methods are skipped instead of run,
and that the per-measurement subprocess of the CPU path works. They time nothing
(numbers live in benchmarks/, never in tests).
"""

import csv
import os

import pytest

from fastclip.bench import contrastive_loss as bench


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _one(rows, method, n):
    hits = [r for r in rows if r["method"] == method and int(r["N"]) == n]
    assert len(hits) == 1, (method, n, rows)
    return hits[0]


def test_cpu_run_in_process_writes_csv_md_png(tmp_path, capsys):
    rc = bench.main(["--device", "cpu", "--sizes", "33,64", "--dims", "24", "--reps", "1",
                     "--no-isolate", "--naive", "formula", "--out", str(tmp_path),
                     "--tag", "smoke"])
    assert rc == 0
    csvs = list(tmp_path.glob("cpu-*-smoke.csv"))
    assert len(csvs) == 1
    prefix = str(csvs[0])[:-4]
    rows = _rows(csvs[0])
    # every method that exists on the CPU, at every size
    methods = [m for m, _ in bench.methods_for(bench.parse_args(["--device", "cpu"])[0])]
    assert {"floor", "naive", "reference"} <= set(methods)
    assert len(rows) == 2 * len(methods)
    assert set(rows[0]) == set(bench.CSV_FIELDS)
    for r in rows:
        assert r["device"] == "cpu" and r["device_name"] and r["torch"] and r["fastclip"]
        assert r["D"] == "24" and r["dtype"] == "fp32"
        if r["status"] != "ok":      # only a backend that is not built may be missing
            assert r["status"].startswith("skipped: backend unavailable"), r
            continue
        assert float(r["fwd_ms"]) > 0 and float(r["fwd_bwd_ms"]) >= float(r["fwd_ms"])
        assert float(r["peak_extra_mb"]) >= 0
        assert r["reps"] == "1"
        n = int(r["N"])
        assert float(r["fwd_bwd_gflops"]) == pytest.approx(
            8 * n * n * 24 / (float(r["fwd_bwd_ms"]) * 1e-3) / 1e9, rel=1e-3)
    floor, naive = _one(rows, "floor", 64), _one(rows, "naive", 64)
    assert float(floor["x_floor_fwd_bwd"]) == 1 and float(naive["x_naive_fwd_bwd"]) == 1
    assert float(naive["x_floor_fwd_bwd"]) == pytest.approx(
        float(naive["fwd_bwd_ms"]) / float(floor["fwd_bwd_ms"]), rel=1e-2)
    assert "clip_loss_naive" in naive["impl"]
    md = open(prefix + ".md").read()
    assert "## fp32, D=24" in md and "| 64 | floor |" in md and "naive: formula" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:     # plots are optional: the run says so and goes on
        assert not os.path.exists(prefix + "-time.png")
    else:
        assert os.path.getsize(prefix + "-time.png") > 1000
        assert os.path.getsize(prefix + "-memory.png") > 1000
    out = capsys.readouterr().out
    assert "x floor" in out and "fwd+bwd ms" in out       # the summary table, printed last
    assert bench.main(["--summarize", str(csvs[0])]) == 0   # read back from the CSV
    out = capsys.readouterr().out
    assert "reference" in out and "naive" in out


def test_memory_budget_skips_instead_of_running(tmp_path):
    # 0.001 GB: the naive formula's N×N logits (6 × 512² × 4 B = 6.3 MB) cannot fit.
    rc = bench.main(["--device", "cpu", "--sizes", "512", "--dims", "8", "--reps", "1",
                     "--no-isolate", "--no-plot", "--methods", "naive,reference",
                     "--max-mem-gb", "0.001", "--naive", "formula", "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(next(tmp_path.glob("cpu-*.csv")))
    naive = _one(rows, "naive", 512)
    assert naive["status"].startswith("skipped: would need") and naive["fwd_ms"] == ""
    assert [r["method"] for r in rows] == ["naive", "reference"]


def test_cpu_measurement_in_fresh_subprocess(tmp_path):
    # The floor: the subprocess then pays only for importing torch (the first call of a
    # torch.library custom op costs seconds more, which the in-process test covers).
    rc = bench.main(["--device", "cpu", "--sizes", "48", "--dims", "16", "--reps", "1",
                     "--methods", "floor", "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    r = _one(_rows(next(tmp_path.glob("cpu-*.csv"))), "floor", 48)
    assert r["status"] == "ok", r
    assert float(r["fwd_bwd_ms"]) > 0 and float(r["peak_extra_mb"]) >= 0
    assert "one N x N buffer" in r["impl"]


def test_floor_runs_on_row_chunks_with_the_same_products():
    import torch
    cfg, _ = bench.parse_args(["--device", "cpu", "--max-mem-gb", "0.0002"])
    n, d = 300, 8                                  # 300 rows: chunks of 256 and 44
    assert bench._floor_rows(n, torch.float32, cfg) == 256
    full_cfg, _ = bench.parse_args(["--device", "cpu"])
    assert bench._floor_rows(n, torch.float32, full_cfg) == n
    x, y, s = bench.make_inputs(n, d, torch.float32, "cpu", 0)
    for c in (cfg, full_cfg):
        st = bench.build_step("floor", x, y, s, c)
        assert ("row chunks" in st.impl) == (c is cfg)
        st.bwd(st.fwd())
        gx, gy = st.outputs
        xd, yd = x.detach().double(), y.detach().double()
        g = xd @ yd.T                              # G = X Yᵀ, dX = G Y, dY = Gᵀ X
        for out, ref in ((gx, g @ yd), (gy, g.T @ xd)):
            assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_cli_rejects_unknown_method_and_dtype():
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "floor,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtypes", "fp8"])
    cfg, _ = bench.parse_args(["--sizes", "1k,2048", "--device", "cpu"])
    assert cfg.sizes == [1024, 2048]
