"""Smoke tests of the benchmark harness (fastclip.bench).

Tiny sizes and few repetitions: these check that each benchmark's quick path produces
complete, consistent CSV / markdown / PNG output, that memory-hungry methods are
skipped instead of run, that the per-measurement subprocess of the CPU path works, that
``fastclip bench`` writes where it is run from (not where the package lives), and that
every loss entry of the method table is consistent. They time nothing (numbers live in
benchmarks/, never in tests).
"""

import csv
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastclip.bench import contrastive_loss as bench
from fastclip.bench import env, report
from fastclip.bench import methods as M
from fastclip.ops.backends import all_backends, available_backends


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _one(rows, method, n):
    hits = [r for r in rows if r["method"] == method and int(r["N"]) == n]
    assert len(hits) == 1, (method, n, rows)
    return hits[0]


def _env_without_commit():
    e = dict(os.environ)
    e.pop("FASTCLIP_COMMIT", None)
    return e


def test_cpu_run_in_process_writes_csv_md_png(tmp_path, capsys):
    rc = bench.main(["--device", "cpu", "--sizes", "33,64", "--dims", "24", "--reps", "1",
                     "--no-isolate", "--naive", "formula", "--out", str(tmp_path),
                     "--tag", "smoke"])
    assert rc == 0
    csvs = list(tmp_path.glob("cpu-*-smoke.csv"))
    assert len(csvs) == 1
    prefix = str(csvs[0])[:-4]
    rows = _rows(csvs[0])
    methods = [m for m, _ in M.methods_for(M.get_loss("clip"), "cpu")]
    assert len(rows) == 2 * len(methods)
    assert set(rows[0]) == set(report.CSV_FIELDS)
    for r in rows:
        assert r["loss"] == "clip" and r["device"] == "cpu" and r["device_name"]
        assert r["torch"] and r["fastclip"] and r["commit"]
        assert r["cpu"] == env.cpu_detail()      # ("" where /proc/cpuinfo says nothing)
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


def test_methods_come_from_the_registry():
    spec = M.get_loss("clip")
    for device in ("cpu", "cuda"):
        names = [m for m, _ in M.methods_for(spec, device)]
        backends = [n for n, b in all_backends().items() if device in b.devices]
        peers = [p.name for p in spec.peers if device in p.devices]
        assert names == ["floor", "naive", *backends, *peers]
        over = [m for m, _ in M.overhead_methods(spec, device)]
        assert over == ["auto", *backends, "naive", "floor"]


@pytest.mark.parametrize("loss", list(M.LOSSES))
def test_loss_entry_fused_equals_its_formula(loss):
    # Each table entry's fused op and naive formula must compute the same loss: the
    # ratios of a run compare like with like.
    spec = M.get_loss(loss)
    x, y, *params = M.make_inputs(spec, 37, 16, torch.float32, "cpu", seed=3)
    for p in params:
        assert p.dim() == 0 and p.dtype == torch.float32 and p.requires_grad
    fused = spec.fused(x, y, tuple(params), "auto")
    ref = spec.formula(x.double(), y.double(), *(p.double() for p in params))
    assert fused.dim() == 0
    assert abs(fused.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert spec.floor_products in (3, 4)
    assert M.fwd_bwd_flop(spec, 10, 2) == spec.floor_products * 2 * 100 * 2


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


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_floor_runs_on_row_chunks_with_the_same_products(loss):
    spec = M.get_loss(loss)
    n, d = 300, 8                                  # 300 rows: chunks of 256 and 44
    small = int(0.0002 * 1e9)
    assert M.floor_rows(n, torch.float32, "cpu", small) == 256
    assert M.floor_rows(n, torch.float32, "cpu", 0) == n
    inputs = M.make_inputs(spec, n, d, torch.float32, "cpu", 0)
    x, y = inputs[:2]
    for budget in (small, 0):
        st = M.build_step(spec, "floor", inputs, device="cpu", max_mem_bytes=budget)
        assert ("row chunks" in st.impl) == (budget == small)
        # The floor's product count holds on chunks too: a one-pass loss's 3 products do
        # not become 4 (no X·Yᵀ recomputed in a backward).
        assert st.impl.startswith(f"{spec.floor_products} x torch.matmul")
        st.bwd(st.fwd())
        gx, gy = st.outputs
        xd, yd = x.detach().double(), y.detach().double()
        g = xd @ yd.T                              # G = X Yᵀ, dX = G Y, dY = Gᵀ X
        for out, ref in ((gx, g @ yd), (gy, g.T @ xd)):
            assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_impl_is_the_measured_steps_not_the_warm_ups():
    # The CPU warms up on at most 256 rows; the floor of a larger N may run on row chunks,
    # and the results must say what was measured.
    from fastclip.bench.measure import Step, time_step  # noqa: PLC0415
    warm, full = (torch.zeros(2, requires_grad=True),), (torch.zeros(3, requires_grad=True),)
    res = time_step(lambda inp: Step(lambda: None, lambda _: None, f"rows {inp[0].numel()}"),
                    full, warm, cuda=False, reps=1, target_s=0.0, reps_range=(1, 1),
                    grad_bytes=0)
    assert res["impl"] == "rows 3"


def test_overhead_mode_writes_its_own_table(tmp_path, capsys):
    rc = bench.main(["--overhead", "--sizes", "16,40", "--dims", "8", "--reps", "3",
                     "--naive", "formula", "--out", str(tmp_path)])
    assert rc == 0
    csvs = list(tmp_path.glob("cpu-*-overhead.csv"))
    assert len(csvs) == 1
    rows = _rows(csvs[0])
    assert set(rows[0]) == set(report.OVERHEAD_FIELDS)
    methods = [m for m, _ in M.overhead_methods(M.get_loss("clip"), "cpu")]
    assert [r["method"] for r in rows] == methods * 2
    for r in rows:
        if r["status"] != "ok":
            assert r["status"].startswith("skipped: backend unavailable"), r
            continue
        assert int(r["calls"]) == 3
        assert 0 < float(r["fwd_us"]) and 0 < float(r["fwd_bwd_us"])
    auto = _one(rows, "auto", 40)
    assert "backend='auto') -> " in auto["impl"]
    from fastclip.ops.backends.cpu import kernels_for
    want = kernels_for(torch.float32, torch.float32)          # the build timed: fp32 rows
    assert want != "avx512bf16"                               # that build runs fp32 as avx512
    assert _one(rows, "cpu", 40)["impl"].endswith(f", {want} kernels")
    assert float(_one(rows, "naive", 40)["x_naive_fwd_bwd"]) == 1
    md = open(str(csvs[0])[:-4] + ".md").read()
    assert "per-call overhead" in md and "| 40 | auto |" in md
    assert ("- processor: " in md) == bool(env.cpu_detail())
    assert "fwd+bwd us" in capsys.readouterr().out


def test_fastclip_bench_writes_to_the_current_directory(tmp_path):
    # From outside the source tree, as from an installed wheel: the files land in the
    # current directory, and the commit is not taken from wherever the package lives.
    r = subprocess.run([sys.executable, "-m", "fastclip", "bench", "--quick", "--sizes", "40",
                        "--dims", "16", "--reps", "1", "--no-isolate", "--naive", "formula"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=_env_without_commit())
    assert r.returncode == 0, r.stderr[-3000:]
    csvs = list(tmp_path.glob("cpu-*.csv"))
    assert len(csvs) == 1 and os.path.exists(str(csvs[0])[:-4] + ".md")
    rows = _rows(csvs[0])
    assert {row["commit"] for row in rows} == {"unknown"}
    assert not (tmp_path / "benchmarks").exists()


def test_default_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert report.default_out_dir() == "."
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    assert report.default_out_dir() == os.path.join("benchmarks", "results")
    cfg, _ = bench.parse_args(["--device", "cpu"])
    assert cfg.out == os.path.join("benchmarks", "results")


@pytest.mark.parametrize("name, expected", [
    ("AMD EPYC", "amd-epyc"),
    ("AMD EPYC 9B14", "amd-epyc-9b14"),
    ("NVIDIA H200", "nvidia-h200"),
    ("Intel(R) Xeon(R) Processor", "intel-xeon"),
    ("Intel(R) Core(TM) i7-1165G7 CPU @ 2.80GHz", "intel-core-i7-1165g7-2-80ghz"),
    ("", "unknown"),
])
def test_result_file_names_drop_trademark_marks(name, expected):
    assert env.slug(name) == expected


def test_commit_comes_from_the_environment_or_a_fastclip_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCLIP_COMMIT", "abc1234")
    assert env.commit(str(tmp_path)) == "abc1234"
    monkeypatch.delenv("FASTCLIP_COMMIT")
    assert env.commit(str(tmp_path)) == "unknown"          # not a checkout
    if shutil.which("git") is None:
        return
    # A checkout of another project: its commit would mislabel fastclip's results.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert env.commit(str(tmp_path)) == "unknown"


def test_distributed_overhead_two_ranks(tmp_path):
    from fastclip.bench import distributed
    rc = distributed.main(["--mode", "overhead", "--worlds", "2", "--sizes", "8", "--dim", "16",
                           "--calls", "3", "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path / "distributed-overhead.csv")
    assert [r["method"] for r in rows] == ["gather", "ring", "openclip"]
    for r in rows:
        assert r["world"] == "2" and r["n_per_rank"] == "4" and r["calls"] == "3"
        assert float(r["fwd_us"]) > 0 and float(r["fwd_bwd_us"]) > 0
    md = (tmp_path / "distributed-overhead.md").read_text()
    assert "## W = 2" in md and "| 8 | ring |" in md


def test_distributed_w1_on_a_cpu_device_index(tmp_path):
    # --device cpu:0 measured everything, then asked CUDA for the device name and wrote nothing.
    from fastclip.bench import distributed
    rc = distributed.main(["--mode", "w1", "--device", "cpu:0", "--sizes", "16", "--dim", "8", "--reps", "1",
                           "--dtypes", "fp32", "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(next(tmp_path.glob("distributed-*.csv")))
    assert rows and all(r["device"].startswith("CPU (") for r in rows)


def test_tokenizer_benchmark(tmp_path):
    from fastclip.bench import tokenizer
    assert tokenizer.main(["--captions", "40", "--reps", "1", "--out", str(tmp_path)]) == 0
    rows = _rows(next(tmp_path.glob("tokenizer-*.csv")))
    assert [r["stage"] for r in rows] == ["clean", "bpe_tokenizers", "bpe_python", "tokenize",
                                          "simple_tokenizer"]
    assert all(float(r["seconds"]) > 0 for r in rows)


def test_cli_rejects_unknown_method_dtype_and_loss():
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "floor,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtypes", "fp8"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--loss", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--overhead", "--huge", "--device", "cuda"])
    cfg, _ = bench.parse_args(["--sizes", "1k,2048", "--device", "cpu"])
    assert cfg.sizes == [1024, 2048]
    cfg, _ = bench.parse_args(["--overhead"])
    assert cfg.sizes == [32, 256, 1024] and cfg.dims == [512] and cfg.dtypes == ["fp32"]


def test_append_keeps_a_measurement_the_rerun_skips(tmp_path):
    common = ["--device", "cpu", "--sizes", "48", "--dims", "16", "--reps", "1", "--methods", "floor",
              "--no-isolate", "--no-plot", "--out", str(tmp_path)]
    assert bench.main(common) == 0
    first = _one(_rows(next(tmp_path.glob("cpu-*.csv"))), "floor", 48)
    assert first["status"] == "ok"
    # The rerun skips the case (a memory budget nothing fits): the measured row stays.
    assert bench.main(common + ["--append", "--max-mem-gb", "0.000001"]) == 0
    again = _one(_rows(next(tmp_path.glob("cpu-*.csv"))), "floor", 48)
    assert again["status"] == "ok" and again["fwd_bwd_ms"] == first["fwd_bwd_ms"]


def test_append_with_other_threads_keeps_both_thread_counts(tmp_path):
    """The merge keyed rows without their thread count: a rerun with --threads 1 replaced the
    2-thread rows, and the table said nothing of it."""
    common = ["--device", "cpu", "--sizes", "48", "--dims", "16", "--reps", "1", "--methods", "floor,cpu",
              "--no-isolate", "--out", str(tmp_path)]
    assert bench.main(common + ["--threads", "2", "--no-plot"]) == 0
    assert bench.main(common + ["--threads", "1", "--append"]) == 0
    rows = _rows(next(tmp_path.glob("cpu-*.csv")))
    assert sorted((r["method"], r["threads"]) for r in rows) == [
        ("cpu", "1"), ("cpu", "2"), ("floor", "1"), ("floor", "2")]
    assert all(r["status"] == "ok" and r["x_floor_fwd_bwd"] for r in rows)
    md = next(tmp_path.glob("cpu-*.md")).read_text()
    assert "| 48 | cpu, 1 thread |" in md and "| 48 | floor, 2 threads |" in md
    # a rerun at one of the counts replaces that count's rows alone
    assert bench.main(common + ["--threads", "1", "--append", "--no-plot"]) == 0
    assert len(_rows(next(tmp_path.glob("cpu-*.csv")))) == 4


def _stop_at_second_measurement(monkeypatch, stop=KeyboardInterrupt):
    """Ctrl-C (or ``stop``) as the sweep's second measurement starts."""
    calls, real = [], bench.measure

    def measure_then_stop(*a, **k):
        calls.append(a)
        if len(calls) == 2:
            raise stop()
        return real(*a, **k)
    monkeypatch.setattr(bench, "measure", measure_then_stop)


def test_an_interrupted_sweep_keeps_its_rows_and_exits_130(tmp_path, monkeypatch, capsys):
    # Ctrl-C: a traceback before; the CSV held the rows so far, but the plots were not redrawn.
    _stop_at_second_measurement(monkeypatch)
    rc = bench.main(["--device", "cpu", "--sizes", "16,32", "--dims", "8", "--reps", "1", "--methods", "floor",
                     "--no-isolate", "--no-plot", "--out", str(tmp_path)])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    rows = _rows(next(tmp_path.glob("cpu-*.csv")))
    assert [(r["N"], r["status"]) for r in rows] == [("16", "ok")]


def test_sigterm_ends_a_sweep_as_terminated(tmp_path, monkeypatch, capsys):
    """SIGTERM (fastclip's handler raises cli.Terminated) was reported as Ctrl-C: 'interrupted', 130."""
    from fastclip import cli
    _stop_at_second_measurement(monkeypatch, cli.Terminated)
    rc = bench.main(["--device", "cpu", "--sizes", "16,32", "--dims", "8", "--reps", "1", "--methods", "floor",
                     "--no-isolate", "--no-plot", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 143 and "terminated (SIGTERM): the rows measured so far" in err and "interrupted" not in err
    assert len(_rows(next(tmp_path.glob("cpu-*.csv")))) == 1


def test_an_interrupted_append_keeps_the_rows_it_did_not_reach(tmp_path, monkeypatch, capsys):
    """At start --append dropped every earlier row it would redo; interrupted after the first,
    the files held only that one."""
    common = ["--device", "cpu", "--sizes", "16,32", "--dims", "8", "--reps", "1", "--methods", "floor",
              "--no-isolate", "--no-plot", "--out", str(tmp_path)]
    assert bench.main(common) == 0
    first = {r["N"]: r for r in _rows(next(tmp_path.glob("cpu-*.csv")))}
    _stop_at_second_measurement(monkeypatch)
    assert bench.main(common + ["--append"]) == 130
    capsys.readouterr()
    after = {r["N"]: r for r in _rows(next(tmp_path.glob("cpu-*.csv")))}
    assert sorted(after) == ["16", "32"] and all(r["status"] == "ok" for r in after.values())
    assert after["32"]["fwd_bwd_ms"] == first["32"]["fwd_bwd_ms"]       # not reached: the earlier row
    assert after["16"]["timestamp"] != first["16"]["timestamp"] or after["16"] != first["16"]


def test_append_records_a_rerun_that_failed(tmp_path, monkeypatch):
    # A backend that now fails must show as failed: keeping the earlier "ok" row hid the
    # regression in the merged table.
    common = ["--device", "cpu", "--sizes", "48", "--dims", "16", "--reps", "1", "--methods", "floor",
              "--no-isolate", "--no-plot", "--out", str(tmp_path)]
    assert bench.main(common) == 0
    monkeypatch.setattr(bench, "measure", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    assert bench.main(common + ["--append"]) == 0
    again = _one(_rows(next(tmp_path.glob("cpu-*.csv"))), "floor", 48)
    assert again["status"].startswith("failed") and "boom" in again["status"]


def test_ratios_pair_rows_of_one_problem_and_thread_count():
    base = dict(loss="clip", N="64", D="16", dtype="fp32", fwd_ms="1", fwd_bwd_ms="4", status="ok")
    rows = [dict(base, method="floor", threads="2"), dict(base, method="cpu", threads="2", fwd_bwd_ms="2"),
            dict(base, method="reference", threads="1", fwd_bwd_ms="8")]
    report.derive(rows)
    assert rows[1]["x_floor_fwd_bwd"] == "0.5" and rows[2]["x_floor_fwd_bwd"] == ""
    over = [dict(method=m, N="64", D=d, dtype="fp32", fwd_us=t, fwd_bwd_us=t, status="ok")
            for m, d, t in (("naive", "16", "10"), ("naive", "128", "40"), ("cpu", "16", "5"),
                            ("cpu", "128", "10"))]
    report.derive_overhead(over)
    assert [r["x_naive_fwd"] for r in over] == ["1", "1", "0.5", "0.25"]


@pytest.mark.parametrize("argv, needle", [
    (["--sizes", ","], "argument --sizes: expected values, comma- or space-separated, got ','"),
    (["--sizes", "64", "x"], "argument --sizes: not a size: 'x' (expected e.g. 4096, 64k, 1m)"),
    (["--methods", "cuda,inf-cl"], "none of them runs on --device cpu"),
    (["--overhead", "--append"], "--append merges into the sweep's table"),
    (["--append", "--overwrite"], "--append merges into the earlier files, --overwrite replaces them"),
    (["--device", "cpu", "--allow-tf32"], "--allow-tf32 is for --device cuda"),
    # 0 and negatives are refused as `fastclip train --threads` refuses them: 0 used to mean
    # "every core" here alone, which the help never said.
    (["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
    (["--threads", "-1"], "argument --threads: expected a positive integer, got '-1'"),
    (["--threads", "two"], "argument --threads: expected a positive integer, got 'two'"),
    (["--threads", "100000"], "argument --threads: expected at most 1024 threads, got '100000'"),
    (["--max-mem-gb", "-1"], "--max-mem-gb must be a finite number >= 0"),
    (["--target-s", "nan"], "--target-s must be a finite number of seconds > 0, got nan"),
    (["--target-s", "-1"], "--target-s must be a finite number of seconds > 0"),
    (["--dims", "0"], "argument --dims: values must be >= 1, got 0"),
])
def test_bad_benchmark_arguments_are_one_line_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_list_flags_take_commas_spaces_or_both_in_every_benchmark(capsys):
    """The loss benchmark took only `--sizes 256,512`, the distributed one only
    `--sizes 256 512`: each refused the other's form."""
    from fastclip.bench import distributed
    for argv in (["--sizes", "1k,2048"], ["--sizes", "1k", "2048"], ["--sizes", "1k,", "2048,1k"]):
        assert bench.parse_args(argv + ["--device", "cpu"])[0].sizes == [1024, 2048]
        assert distributed.build_parser().parse_args(argv).sizes == [1024, 2048]
    cfg, _ = bench.parse_args(["--methods", "floor", "cpu,naive", "--dtypes", "fp32,bf16",
                               "--dims", "8", "16"])
    assert (cfg.methods, cfg.dtypes, cfg.dims) == (["floor", "cpu", "naive"], ["fp32", "bf16"], [8, 16])
    args = distributed.build_parser().parse_args(["--worlds", "2,4", "--impls", "ring", "gather,ring",
                                                  "--dtypes", "fp32"])
    assert (args.worlds, args.impls, args.dtypes) == ([2, 4], ["ring", "gather"], ["fp32"])
    with pytest.raises(SystemExit):
        distributed.build_parser().parse_args(["--impls", "ring,allgather"])
    assert ("argument --impls: invalid choice: 'allgather' (choose from gather, ring, openclip)"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        distributed.build_parser().parse_args(["--worlds", "2,two"])
    assert "argument --worlds: invalid value: 'two'" in capsys.readouterr().err


def test_threads_default_to_every_core_and_take_a_count():
    assert bench.parse_args([])[0].threads == env.cpu_count()
    assert bench.parse_args(["--threads", "1"])[0].threads == 1


def test_more_threads_than_cores_is_said_in_the_log_and_the_header(tmp_path, monkeypatch, capsys):
    """--threads 64 on 2 cores ran without a word: the header said "64 threads" and the times
    measured the threads' sharing of the cores."""
    monkeypatch.setattr(env, "cpu_count", lambda: 2)
    assert env.threads_warning(2) == "" and env.threads_warning(None) == ""
    assert bench.main(["--device", "cpu", "--sizes", "16", "--dims", "8", "--reps", "1",
                       "--methods", "floor", "--no-isolate", "--no-plot", "--threads", "3",
                       "--out", str(tmp_path)]) == 0
    note = "3 threads on 2 cores this process may run on: the threads share cores"
    assert f"warning: {note}" in capsys.readouterr().out
    assert f"- warning: {note}" in next(tmp_path.glob("cpu-*.md")).read_text()


def test_cpu_detail_tells_apart_cpus_of_one_name(monkeypatch):
    """Virtual machines name several AMD generations "AMD EPYC": the results record the CPU's
    family, model and vector extension beside the name."""
    info = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
            "processor\t: 1\ncpu family\t: 99\n")
    import builtins
    import io
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: io.StringIO(info)
                        if f == "/proc/cpuinfo" else real_open(f, *a, **k))
    assert env.cpu_detail() == "family 25 model 17, AVX-512 (BF16)"
    assert env.cpu_name() == "AMD EPYC"
    info = "cpu family\t: 6\nmodel\t\t: 85\nflags\t\t: sse avx2\n"
    assert env.cpu_detail() == "family 6 model 85, AVX2"
    assert env.env_info("cpu")["cpu"] == "family 6 model 85, AVX2"


def test_processor_is_a_column_and_the_header_names_every_one_of_the_rows(tmp_path):
    """The header gave the last run's processor alone: rows merged by --append from another
    machine of the same name read as this one's. Files from before the column read it empty."""
    info = {"cpu": "family 26 model 2, AVX-512 (BF16)"}
    rows = [{"cpu": info["cpu"]}, {"cpu": ""}, {"cpu": "family 25 model 17, AVX-512"}]
    assert report.processor_notes(rows[:1], info, "cpu", 1) == [f"- processor: {info['cpu']}."]
    assert report.processor_notes(rows, info, "cpu", 1) == [
        "- processor (each row's in the CSV's `cpu` column): family 26 model 2, AVX-512 (BF16); "
        "not recorded; family 25 model 17, AVX-512."]
    assert report.processor_notes(rows, info, "cuda", 99) == []
    assert report.processor_notes([], info, "cpu", 1) == [f"- processor: {info['cpu']}."]
    assert report.processor_notes(rows[2:], info, "cpu", 1) == ["- processor: family 25 model 17, AVX-512."]
    old = tmp_path / "old.csv"
    old.write_text("device,method,N\ncpu,floor,8\n")
    assert report.read_csv(str(old))[0]["cpu"] == ""
    assert "cpu" in report.CSV_FIELDS and "cpu" not in report.SWEEP_COLUMNS


def test_summarize_names_the_files_own_columns_and_the_missing_ones(tmp_path, capsys):
    # A foreign CSV was reported with a `loss` column it does not have (read_csv gives every
    # row one, for files from before that column) and without saying what was missing.
    good = tmp_path / "good.csv"
    good.write_text("filepath,title\nimages/0.png,a red circle\n")
    assert bench.main(["--summarize", str(good)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "not a results CSV" in err and "its columns are ['filepath', 'title']" in err
    assert "'loss'" not in err
    assert "['method', 'N', 'fwd_us', 'fwd_bwd_us'], are missing" in err
    near_sweep = tmp_path / "sweep.csv"        # a sweep's table short of one column
    cols = [c for c in report.CSV_FIELDS if c != "timestamp"]
    near_sweep.write_text(",".join(cols) + "\n" + ",".join("1" for _ in cols) + "\n")
    assert bench.main(["--summarize", str(near_sweep)]) == 2
    assert "sweep's table requires, ['timestamp'], are missing" in capsys.readouterr().err
    for text, needle in (("", "the file is empty"),
                         (",".join(report.CSV_FIELDS) + "\n", "no rows to summarize")):
        f = tmp_path / "f.csv"
        f.write_text(text)
        assert bench.main(["--summarize", str(f)]) == 2
        assert needle in capsys.readouterr().err


def test_summarize_reads_a_sweep_written_before_the_loss_column(tmp_path, capsys):
    old = tmp_path / "old.csv"
    cols = [c for c in report.CSV_FIELDS if c != "loss"]
    row = dict.fromkeys(cols, "")
    row.update(device="cpu", method="floor", N="64", D="8", dtype="fp32", fwd_ms="1",
               fwd_bwd_ms="3", status="ok")
    with open(old, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerow(row)
    assert bench.main(["--summarize", str(old)]) == 0
    assert "floor" in capsys.readouterr().out


def test_out_that_is_a_file_and_foreign_csvs_are_one_line_errors(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", str(f)])
    assert "exists and is not a directory" in capsys.readouterr().err
    tok = tmp_path / "tok.csv"
    tok.write_text("stage,seconds\nclean,1\n")
    assert bench.main(["--summarize", str(tok)]) == 2
    assert "not a results CSV" in capsys.readouterr().err
    # A markdown table (rows of uneven length) and a distributed overhead table: the same
    # one-line error (the first crashed sorting its columns, the second printed empty ratios).
    md = tmp_path / "t.md"
    md.write_text("# title\n\n| N | method |\n|---:|---|\n| 8 | cpu |\n")
    dist_over = tmp_path / "d.csv"
    dist_over.write_text("world,method,N,fwd_us,fwd_bwd_us,status\n2,gather,32,1,2,ok\n")
    for f in (md, dist_over):
        assert bench.main(["--summarize", str(f)]) == 2
        err = capsys.readouterr().err
        assert "not a results CSV" in err and len(err.strip().splitlines()) == 1, err
    from fastclip.bench import distributed
    with pytest.raises(SystemExit):
        distributed.main(["--mode", "overhead", "--worlds", "2", "--sizes", "33", "--out", str(tmp_path)])
    assert "N=33 is not a multiple of W=2" in capsys.readouterr().err


def test_recorded_results_are_not_replaced_without_being_asked(tmp_path, monkeypatch, capsys):
    """From a checkout's root the default output folder holds the recorded results: a run
    without --out replaced a 28-row table with its few rows. It now stops before measuring;
    --overwrite replaces, --append merges, an explicit --out is the user's to replace."""
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    prefix = report.output_prefix(str(results), "cpu", env.cpu_name())
    open(prefix + ".csv", "w").write("recorded\n")
    argv = ["--device", "cpu", "--sizes", "16", "--dims", "8", "--reps", "1", "--no-isolate",
            "--methods", "floor", "--no-plot"]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastclip bench: error: ") and "exists and --out was not given" in err
    assert open(prefix + ".csv").read() == "recorded\n"
    assert bench.main(argv + ["--overhead"]) == 0           # its own file: none there yet
    assert bench.main(argv + ["--overhead"]) == 2           # now there is
    capsys.readouterr()
    assert bench.main(argv + ["--overwrite"]) == 0
    assert _one(_rows(prefix + ".csv"), "floor", 16)["status"] == "ok"
    assert bench.main(argv + ["--out", str(results)]) == 0  # chosen: replaced
    from fastclip.bench import distributed, tokenizer
    (results / "distributed-overhead.csv").write_text("recorded\n")
    with pytest.raises(SystemExit):
        distributed.main(["--mode", "overhead", "--worlds", "2", "--sizes", "8", "--dim", "8"])
    assert "distributed-overhead.csv exists" in capsys.readouterr().err
    (results / f"tokenizer-{env.slug(env.cpu_name())}.md").write_text("recorded\n")
    with pytest.raises(SystemExit):
        tokenizer.main(["--captions", "10", "--reps", "1"])
    assert "pass --overwrite to replace it, or --out DIR" in capsys.readouterr().err


def test_progress_lines_carry_the_derived_numbers(tmp_path, capsys):
    """Each line was printed before derive() ran: "nan GFLOP/s  x floor -" on every one."""
    assert bench.main(["--device", "cpu", "--sizes", "32", "--dims", "8", "--reps", "2", "--no-isolate",
                       "--methods", "floor,cpu", "--no-plot", "--out", str(tmp_path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  fp32 D=8")]
    assert len(lines) == 2 and not any("nan" in ln for ln in lines)
    assert "x floor 1 " in lines[0] and "x floor - " not in lines[1]


def test_methods_asked_for_that_this_device_lacks_get_a_row_saying_so(tmp_path):
    assert bench.main(["--device", "cpu", "--sizes", "16", "--dims", "8", "--reps", "1", "--no-isolate",
                       "--methods", "floor,cuda,inf-cl", "--no-plot", "--out", str(tmp_path)]) == 0
    rows = _rows(next(tmp_path.glob("cpu-*.csv")))
    assert _one(rows, "floor", 16)["status"] == "ok"
    assert _one(rows, "cuda", 16)["status"] == "skipped: runs on cuda only, not --device cpu"
    assert _one(rows, "inf-cl", 16)["status"].startswith("skipped: runs on cuda only")


def test_a_floor_with_all_products_in_its_forward_has_no_forward_ratio():
    """SigLIP's floor on row chunks runs its three products in the forward: its forward time
    is not one X·Yᵀ, so neither its fwd GFLOP/s nor anyone's x floor fwd is derived from it."""
    base = dict(loss="siglip", N="64", D="8", dtype="fp32", threads="2", status="ok")
    rows = [dict(base, method="floor", impl=f"3 x torch.matmul on row chunks of 32, {M.ALL_IN_FORWARD}",
                 fwd_ms="3", fwd_bwd_ms="3"),
            dict(base, method="cpu", impl="", fwd_ms="2.9", fwd_bwd_ms="3")]
    report.derive(rows)
    assert rows[0]["fwd_gflops"] == "" and rows[0]["x_floor_fwd"] == "" and rows[0]["x_floor_fwd_bwd"] == "1"
    assert rows[1]["fwd_gflops"] != "" and rows[1]["x_floor_fwd"] == "" and rows[1]["x_floor_fwd_bwd"] == "1"


def test_distributed_refuses_a_backend_its_ranks_cannot_run(capsys, tmp_path):
    from fastclip.bench import distributed
    with pytest.raises(SystemExit) as e:
        distributed.main(["--worlds", "2", "--sizes", "64", "--dim", "8", "--backend", "cuda",
                          "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--backend 'cuda' runs on cuda; this mode's ranks run on cpu" in capsys.readouterr().err


def test_distributed_refuses_more_ranks_than_the_machine_bears(capsys, tmp_path, monkeypatch):
    # --worlds 64 on 2 cores spawned 64 ranks and ran for minutes: refused before any spawn
    # unless --max-world allows it.
    from fastclip.bench import distributed
    monkeypatch.setattr(distributed, "cpu_count", lambda: 2)
    spawned = []

    class Stop(Exception):
        pass

    def spawn(body, world, args, timeout_s):
        spawned.append(world)
        raise Stop("stop here")
    monkeypatch.setattr(distributed, "_spawn", spawn)
    argv = ["--mode", "overhead", "--sizes", "64", "--dim", "8", "--out", str(tmp_path)]
    for extra in ([], ["--mode", "cpu"]):
        with pytest.raises(SystemExit) as e:
            distributed.main(argv + extra + ["--worlds", "2", "64"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert ("--worlds 64: more ranks than the default bound 8: 4 ranks per core on the 2 "
                "cores" in err and "pass --max-world 64 to run it anyway" in err), err
    with pytest.raises(SystemExit):
        distributed.main(argv + ["--worlds", "16", "--max-world", "8"])
    assert "--worlds 16: more ranks than --max-world 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        distributed.main(argv + ["--max-world", "0"])
    assert "--max-world must be positive, got 0" in capsys.readouterr().err
    assert spawned == []
    with pytest.raises(Stop, match="stop here"):
        distributed.main(argv + ["--worlds", "64", "--max-world", "64"])
    assert spawned == [64]
    spawned.clear()
    with pytest.raises(Stop, match="stop here"):
        distributed.main(argv + ["--worlds", "8"])         # at the bound: allowed
    assert spawned == [8]


def test_distributed_descriptions_name_each_world_size():
    from fastclip.bench.distributed import _by_world
    got = _by_world({2: {"ring": "dist_impl='ring'", "openclip": "ClipLoss(world_size=2)"},
                     4: {"ring": "dist_impl='ring'", "openclip": "ClipLoss(world_size=4)"}})
    assert got == {"ring": "dist_impl='ring'",
                   "openclip": "W = 2: ClipLoss(world_size=2); W = 4: ClipLoss(world_size=4)"}


def test_overhead_table_heads_its_two_ratio_columns_apart():
    rows = [dict(method=m, N="8", fwd_us="1", fwd_bwd_us="2", calls="3", status="ok") for m in ("naive", "cpu")]
    report.derive_overhead(rows)
    head = report.overhead_table(rows, md=False).splitlines()[0]
    assert "xnaive f " in head and "xnaive fb" in head
    # Several (dtype, D): the console table says which row is which.
    rows = [dict(method=m, N="8", D=d, dtype="fp32", fwd_us="1", fwd_bwd_us="2", calls="3", status="ok")
            for m in ("naive", "cpu") for d in ("16", "128")]
    report.derive_overhead(rows)
    lines = report.overhead_table(rows, md=False).splitlines()
    assert lines[0].split()[:4] == ["dtype", "D", "N", "method"]
    assert [ln.split()[1] for ln in lines[2:]] == ["16", "16", "128", "128"]


def test_the_step_whose_memory_is_measured_maps_its_buffers_fresh():
    from fastclip.bench.measure import malloc_for_memory, malloc_for_speed, proc_status_kb, reset_peak_rss
    if not (malloc_for_memory() and malloc_for_speed()):
        pytest.skip("not glibc: mallopt is not there")
    assert malloc_for_memory() and reset_peak_rss()
    base = proc_status_kb("VmRSS")
    t = torch.ones(8 << 20, dtype=torch.uint8)       # 8 MB, below the 32 MB of malloc_for_speed
    assert (proc_status_kb("VmHWM") - base) * 1024 >= 7 << 20
    del t
    malloc_for_speed()


@pytest.mark.skipif("cpu" not in available_backends("cpu"),
                    reason="the C++ CPU kernels are not built")
def test_ab_cpu_builds_interleaves_builds_loaded_side_by_side(tmp_path):
    """scripts/ab_cpu_builds.py: the installed build and a copy of it, each loaded under its
    own name, give the same gradients, and every build and the floor get a row."""
    from fastclip import _ext
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "scripts", "ab_cpu_builds.py")
    if not os.path.isfile(script):
        pytest.skip("not a source checkout")
    copy = tmp_path / "copy" / os.path.basename(_ext.extension().__file__)
    copy.parent.mkdir()
    shutil.copy(_ext.extension().__file__, copy)
    out = subprocess.run([sys.executable, script, "installed", str(copy), "--n", "67", "--d", "9",
                          "--rounds", "3", "--floor", "--loss", "clip"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "1:copy: max |grad - first build's| = 0\n" in out.stdout, out.stdout
    rows = [line.split()[0] for line in out.stdout.splitlines() if "/ first build" in line]
    assert rows == ["0:installed", "1:copy", "floor"], out.stdout
    bad = subprocess.run([sys.executable, script, str(tmp_path / "missing.so")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no such file" in bad.stderr
    # BUILD@ISA: one build's instruction sets side by side (generic exists on every CPU),
    # on bf16 features; the same sums in another order, so close, not equal.
    isa = subprocess.run([sys.executable, script, "installed@avx2", "installed@generic", "--n", "67",
                          "--d", "9", "--rounds", "2", "--dtype", "bf16"],
                         capture_output=True, text=True, timeout=300)
    assert isa.returncode == 0, isa.stderr
    rows = [line.split()[0] for line in isa.stdout.splitlines() if "/ first build" in line]
    assert rows == ["0:installed@avx2", "1:installed@generic"], isa.stdout
    assert "bf16, N = 67" in isa.stdout


def test_append_onto_a_file_it_cannot_merge_is_one_line_before_measuring(tmp_path, monkeypatch, capsys):
    """An --overhead table, another CSV or a truncated results file at the output name failed
    with a traceback (KeyError, TypeError) after the whole sweep had run."""
    common = ["--device", "cpu", "--sizes", "16", "--dims", "8", "--reps", "1", "--methods", "floor",
              "--no-isolate", "--no-plot", "--out", str(tmp_path)]
    assert bench.main(common) == 0
    csv_path = next(tmp_path.glob("cpu-*.csv"))
    good = csv_path.read_text()
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured before refusing"))
    for name, text in (("overhead", "method,N,fwd_us,fwd_bwd_us,status\nnaive,32,1,2,ok\n"),
                       ("foreign", "filepath,title\na.png,a cat\n"),
                       ("truncated", good[:len(good.splitlines()[0]) + 40])):
        csv_path.write_text(text)
        capsys.readouterr()
        assert bench.main(common + ["--append"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("fastclip bench: error: --append:") and err.count("\n") == 1, (name, err)
        assert csv_path.read_text() == text


def test_an_interrupted_distributed_run_writes_the_finished_world_sizes(capsys, tmp_path, monkeypatch):
    """Ctrl-C printed a traceback (one per process) and wrote nothing, also what had finished."""
    from fastclip.bench import distributed

    def spawn(body, world, args, timeout_s):
        if world == 4:
            raise KeyboardInterrupt
        row = dict(world=world, impl="gather", N=64, n_per_rank=32, D=8, dtype="fp32", threads_per_rank=1,
                   time_s=0.01, peak_mib_per_rank=1.0)
        return {0: ([row], {"gather": "dist_impl='gather'"})}
    monkeypatch.setattr(distributed, "_spawn", spawn)
    rc = distributed.main(["--mode", "cpu", "--worlds", "2", "4", "--sizes", "64", "--dim", "8",
                           "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted: the finished world sizes are in" in err and "Traceback" not in err
    text = (tmp_path / "distributed-cpu.csv").read_text()
    assert len(text.splitlines()) == 2
    from fastclip.bench import tokenizer
    monkeypatch.setattr(tokenizer, "run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert tokenizer.main(["--quick", "--out", str(tmp_path / "tk")]) == 130
    assert "interrupted: nothing written" in capsys.readouterr().err


def test_plots_of_an_earlier_run_are_not_left_beside_new_numbers(tmp_path, capsys):
    """--no-plot (or no matplotlib) left the earlier run's PNGs beside a CSV they no longer show."""
    common = ["--device", "cpu", "--sizes", "16", "--dims", "8", "--reps", "1", "--methods", "floor",
              "--no-isolate", "--no-plot", "--out", str(tmp_path)]
    assert bench.main(common) == 0
    prefix = str(next(tmp_path.glob("cpu-*.csv")))[:-len(".csv")]
    for suffix in ("-time.png", "-memory.png"):
        with open(prefix + suffix, "wb") as f:
            f.write(b"an earlier plot")
    assert bench.main(common + ["--overwrite"]) == 0
    assert not list(tmp_path.glob("*.png")) and "removed the earlier plots" in capsys.readouterr().out


def test_distributed_refuses_w1_flags_in_the_other_modes(capsys, tmp_path):
    """--mode cpu --dtypes bf16 --device cuda ran fp32 on CPU ranks and recorded --device cuda."""
    from fastclip.bench import distributed
    for flag in (["--dtypes", "bf16"], ["--device=cuda"], ["--reps", "3"]):
        with pytest.raises(SystemExit) as e:
            distributed.main(["--mode", "cpu", "--worlds", "2", "--sizes", "64", *flag, "--out", str(tmp_path)])
        assert e.value.code == 2
        assert "applies to --mode w1 only" in capsys.readouterr().err
    # Flags of the other modes were ignored too (--mode w1 --impls openclip ran plain, gather and
    # ring), and an abbreviation (--rep 3) passed the check unseen.
    for mode, flag, needle in (("w1", ["--impls", "openclip"], "--impls applies to --mode cpu and overhead"),
                               ("w1", ["--worlds", "4"], "--worlds applies to"),
                               ("cpu", ["--calls", "5"], "--calls applies to --mode overhead only"),
                               ("cpu", ["--target-s", "9"], "--target-s applies to --mode overhead only"),
                               ("cpu", ["--rep", "3"], "unrecognized arguments: --rep")):
        with pytest.raises(SystemExit) as e:
            distributed.main(["--mode", mode, "--device", "cpu", "--sizes", "64", *flag, "--out", str(tmp_path)]
                             if mode == "w1" else ["--mode", mode, "--sizes", "64", *flag, "--out", str(tmp_path)])
        assert e.value.code == 2 and needle in capsys.readouterr().err, (mode, flag)


def _oom_rank(rank, world, args, threads, rows, impls):
    """A spawned rank's body: one case measured, then rank 1 out of memory while rank 0 waits."""
    import time
    impls["gather"] = "dist_impl='gather'"
    rows.append(dict(world=world, impl="gather", N=64, n_per_rank=32, D=8, dtype="fp32", threads_per_rank=1,
                     time_s=0.01, peak_mib_per_rank=1.0))
    if rank == 1:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")
    time.sleep(30)              # blocked in a collective the failed rank never joins


def _killed_rank(rank, world, args, threads, rows, impls):
    """A spawned rank's body: rank 1 killed without a word (the OOM killer), rank 0 waiting in a
    collective (which fails at once: its peer closed the connection)."""
    import signal

    import torch.distributed as dist
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def _killed_while_computing(rank, world, args, threads, rows, impls):
    """A spawned rank's body: both measure one case; then rank 1 is killed without a word while
    rank 0 computes the next, larger case (no collective to fail it)."""
    import signal
    import time
    rows.append(dict(world=world, impl="gather", N=64, n_per_rank=32, D=8, dtype="fp32", threads_per_rank=1,
                     time_s=0.01, peak_mib_per_rank=1.0))
    if rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(40)


def test_distributed_rank_failures_keep_the_measured_cases_and_never_hang(capsys, tmp_path, monkeypatch):
    """A rank that ran out of memory at a large N ended in a nested traceback and discarded the
    sizes measured before; one killed without a word (the OOM killer) left the parent waiting 30
    minutes on its queue."""
    import time

    from fastclip.bench import distributed
    monkeypatch.setattr(distributed, "_cpu_rank", _oom_rank)
    t0 = time.monotonic()
    rc = distributed.main(["--mode", "cpu", "--worlds", "2", "--sizes", "64", "--dim", "8",
                           "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "rank 1 failed at world size 2: RuntimeError: DefaultCPUAllocator" in err and "measured before" in err
    assert time.monotonic() - t0 < 25
    assert len(_rows(tmp_path / "distributed-cpu.csv")) == 1

    monkeypatch.setattr(distributed, "_cpu_rank", _killed_rank)
    t0 = time.monotonic()
    rc = distributed.main(["--mode", "cpu", "--worlds", "2", "--sizes", "64", "--dim", "8",
                           "--out", str(tmp_path / "k")])
    err = capsys.readouterr().err
    assert rc == 1 and "rank 1 killed by signal 9 (SIGKILL: out of memory?) before reporting" in err, err
    assert time.monotonic() - t0 < 25

    # Killed while rank 0 was still computing: rank 0's measured case was still in rank 0's
    # process (the parent held only finished ranks' rows), and nothing was written.
    monkeypatch.setattr(distributed, "_cpu_rank", _killed_while_computing)
    t0 = time.monotonic()
    rc = distributed.main(["--mode", "cpu", "--worlds", "2", "--sizes", "64", "--dim", "8",
                           "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 1 and "rank 1 killed by signal 9" in err and "measured before" in err, err
    assert time.monotonic() - t0 < 30
    assert len(_rows(tmp_path / "c" / "distributed-cpu.csv")) == 1


def test_distributed_sizes_beyond_the_machines_memory_are_refused_up_front(capsys, tmp_path):
    """--mode w1 --sizes 16 200000000 measured N = 16, then the system killed the process for
    memory: nothing written, no word."""
    from fastclip.bench import distributed
    for argv, needle in ((["--mode", "w1", "--device", "cpu", "--dtypes", "fp32", "--sizes", "16", str(10 ** 12)],
                          f"--sizes {10 ** 12}: needs at least"),
                         (["--sizes", "256", str(2 * 10 ** 7), "--worlds", "2"],
                          f"--sizes {2 * 10 ** 7}: needs at least")):
        with pytest.raises(SystemExit) as e:
            distributed.main(argv + ["--dim", "8", "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "available; choose smaller sizes" in err, err


def test_distributed_lists_are_deduplicated_and_the_overhead_csv_has_its_ratios(tmp_path):
    """--sizes 8 8 wrote two rows the markdown showed as one; the overhead CSV lacked the ratio
    columns its markdown shows."""
    from fastclip.bench import distributed
    rc = distributed.main(["--mode", "overhead", "--worlds", "2", "2", "--sizes", "8", "8", "--dim", "16",
                           "--impls", "gather", "gather", "openclip", "--calls", "3", "--out", str(tmp_path)])
    assert rc == 0
    rows = _rows(tmp_path / "distributed-overhead.csv")
    assert [r["method"] for r in rows] == ["gather", "openclip"]
    assert float(rows[0]["x_naive_fwd"]) > 0 and float(rows[1]["x_naive_fwd_bwd"]) == 1


def test_memory_estimates_charge_n_squared_only_to_what_holds_it():
    """Every fastclip backend was charged the reference's N² tiles: --max-mem-gb 0.3 skipped the
    cpu kernel (~4 MB at N = 4096, bf16) and kept open_clip's loss (~129 MB)."""
    spec = M.get_loss("clip")

    def est(method, n, dtype=torch.bfloat16, d=16):
        return M.extra_bytes_estimate(spec, method, n, d, dtype, device="cpu")
    assert est("cpu", 4096) < est("naive", 4096) / 4 and est("cpu", 4096) <= 80 << 20
    assert est("reference", 4096) > est("cpu", 4096)          # its chunked form holds N² tiles
    for n in (1024, 4096, 65536):                            # the fused kernels: O(N·D) (+ the dY budget)
        assert est("cpu", 2 * n) - est("cpu", n) <= 8 * n * 16 * 4 + 64 * n + (64 << 20)
        assert est("triton", 2 * n) == 2 * est("triton", n)
    if importlib.util.find_spec("triton") is None:
        return      # the gemm chunk's exact size comes from its (Triton) module
    assert est("gemm", 1 << 15) - est("triton", 1 << 15) == (1 << 26) * 4   # one 256 MiB chunk
    # Past 2^19 columns the chunk is the 128-row floor, beyond 256 MiB (charged at fp32 size:
    # the estimate is told the accumulator's bytes, an upper bound for 16-bit features).
    assert est("gemm", 1 << 21) - est("triton", 1 << 21) == 128 * (1 << 21) * 4


def test_output_names_seeds_and_appends_that_would_mix_or_fail_late(capsys, tmp_path):
    """--tag siglip wrote a clip run into the SigLIP files and --append then mixed the two losses in
    one table; a seed above 9.2e12 failed every row; a folder with a results file's name failed
    after the whole sweep, leaving a .tmp behind."""
    common = ["--device", "cpu", "--sizes", "16", "--dims", "8", "--reps", "1", "--methods", "floor",
              "--no-isolate", "--no-plot", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        bench.main(common + ["--tag", "SigLIP"])
    assert e.value.code == 2 and "--tag 'SigLIP': the name of a loss" in capsys.readouterr().err
    assert bench.main(common + ["--loss", "siglip"]) == 0
    siglip_csv = next(tmp_path.glob("cpu-*-siglip.csv"))
    os.rename(siglip_csv, str(siglip_csv).replace("-siglip.csv", ".csv"))    # a clip run's name
    assert bench.main(common + ["--append"]) == 2
    assert "holds siglip loss rows, this run measures clip" in capsys.readouterr().err
    assert bench.main(common + ["--seed", str(10 ** 17), "--overwrite"]) == 0
    rows = _rows(next(tmp_path.glob("cpu-*.csv")))
    assert rows and all(r["status"] == "ok" for r in rows), rows
    folder = tmp_path / "f"
    (folder / os.path.basename(str(siglip_csv)).replace("-siglip.csv", ".csv")).mkdir(parents=True)
    argv = common[:-1] + [str(folder)]
    assert bench.main(argv) == 2
    assert "is a folder: the results file of that name cannot be written" in capsys.readouterr().err
    assert not list(folder.glob("*.tmp"))

    def boom(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        report._replace_with(str(tmp_path / "t.md"), boom)
    assert not list(tmp_path.glob("t.md*"))


@pytest.mark.parametrize("name", ["contrastive_loss", "distributed", "tokenizer"])
def test_benchmark_scripts_name_themselves(name):
    # `python benchmarks/bench_<op>.py` names that command in its usage and error lines,
    # not `fastclip bench` (which a reader of the script's output could not run as typed).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join("benchmarks", f"bench_{name}.py")
    if not os.path.exists(os.path.join(root, script)):
        pytest.skip("benchmarks/ is not beside the tests (an installed copy)")
    r = subprocess.run([sys.executable, script, "--no-such-flag"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"usage: python {script}" in r.stderr and "fastclip bench" not in r.stderr.split("\n")[0]
    assert f"python {script}: error: unrecognized arguments: --no-such-flag" in r.stderr
