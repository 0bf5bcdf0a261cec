"""Where results go and how they read: file names, CSV, markdown tables, the summary.

Every file is written to a temporary name and renamed, and rewritten after every
measurement, so an interrupted run keeps what it measured and never leaves half a file.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os

from .env import gb, slug, threads_warning
from .methods import ALL_IN_FORWARD, FLOOR, NAIVE, fwd_bwd_flop, fwd_flop, get_loss

__all__ = ["CSV_FIELDS", "OVERHEAD_FIELDS", "BenchError", "default_out_dir", "output_prefix", "write_csv",
           "check_replace", "add_out_args", "ListArg", "parse_size",
           "read_csv", "read_table", "write_text", "check_out_dir", "derive", "derive_overhead", "write_markdown",
           "write_overhead_markdown", "processor_notes", "summary_table", "overhead_table", "num",
           "table_problem", "table_names"]

CSV_FIELDS = ["loss", "device", "device_name", "cpu", "torch", "triton", "fastclip", "commit",
              "threads", "method", "impl", "N", "D", "dtype", "fwd_ms", "fwd_bwd_ms",
              "peak_extra_mb", "fwd_gflops", "fwd_bwd_gflops", "x_floor_fwd",
              "x_floor_fwd_bwd", "x_naive_fwd", "x_naive_fwd_bwd", "reps", "status",
              "timestamp"]
OVERHEAD_FIELDS = ["loss", "device", "device_name", "cpu", "torch", "fastclip", "commit", "threads",
                   "method", "impl", "N", "D", "dtype", "fwd_us", "fwd_bwd_us",
                   "x_naive_fwd", "x_naive_fwd_bwd", "fwd_us_min", "fwd_bwd_us_min", "calls",
                   "status", "timestamp"]
RESULTS_DIR = os.path.join("benchmarks", "results")


def default_out_dir() -> str:
    """``./benchmarks/results`` when the current directory has it (a checkout), else
    the current directory itself: never a path relative to the installed package."""
    return RESULTS_DIR if os.path.isdir(RESULTS_DIR) else "."


class BenchError(Exception):
    """A problem a benchmark finds before measuring (the device, the output files): its
    ``main`` prints it as one line, ``fastclip bench: error: ...``, and exits with status 2."""


def parse_size(tok: str) -> int:
    """A size as the benchmarks take it: 4096, 64k (65536) or 1m (1048576); at least 1."""
    tok = tok.strip().lower()
    mult = 1
    if tok.endswith("k"):
        tok, mult = tok[:-1], 1024
    elif tok.endswith("m"):
        tok, mult = tok[:-1], 1 << 20
    try:
        v = int(tok) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size: {tok!r} (expected e.g. 4096, 64k, 1m)") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {v}")
    return v


class ListArg(argparse.Action):
    """A list flag that takes its values comma-separated, space-separated or both
    (``--sizes 256,512``, ``--sizes 256 512``), every benchmark alike: the loss benchmark
    took only the first form and the distributed one only the second, each refusing the
    other's. ``convert`` turns one value (an ``argparse.ArgumentTypeError`` or ``ValueError``
    refuses it), ``allowed`` lists the accepted values; repeats are dropped, order kept."""

    def __init__(self, option_strings, dest, convert=str, allowed=None, **kw):
        kw.setdefault("nargs", "+")
        if allowed is not None:
            kw.setdefault("metavar", "{" + ",".join(allowed) + "}")
        super().__init__(option_strings, dest, **kw)
        self.convert, self.allowed = convert, allowed

    def __call__(self, parser, namespace, values, option_string=None):
        out = []
        for tok in (t.strip() for v in values for t in v.split(",")):
            if not tok:
                continue
            if self.allowed is not None and tok not in self.allowed:
                parser.error(f"argument {option_string}: invalid choice: {tok!r} (choose from "
                             f"{', '.join(self.allowed)})")
            try:
                out.append(self.convert(tok))
            except argparse.ArgumentTypeError as e:
                parser.error(f"argument {option_string}: {e}")
            except ValueError:
                parser.error(f"argument {option_string}: invalid value: {tok!r}")
        if not out:
            parser.error(f"argument {option_string}: expected values, comma- or "
                         f"space-separated, got {' '.join(values)!r}")
        setattr(namespace, self.dest, list(dict.fromkeys(out)))


def add_out_args(p) -> None:
    """``--out`` and ``--overwrite``, the same in every benchmark."""
    p.add_argument("--out", default=None,
                   help="output folder (default: ./benchmarks/results if the current "
                        "directory has one, else the current directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace result files already in the default output folder (a "
                        "checkout's benchmarks/results holds the recorded results: without "
                        "--out they are never replaced silently)")


def check_replace(paths: list[str], out_given: bool, overwrite: bool, append: bool | None = None) -> None:
    """Refuse, before anything is measured, to replace existing result files in the default
    output folder: without ``--out`` a run from a checkout's root would rewrite the recorded
    results (a ``--quick`` run replaced a 28-row table with its 8 rows). ``--out DIR``
    (chosen, so replaced), ``--overwrite`` and ``--append`` (merged) pass; ``append`` is None
    for a benchmark without ``--append``."""
    folders = [q for q in paths if os.path.isdir(q)]
    if folders:
        # (a run measured for minutes, then failed on the write with a traceback and a .tmp left)
        raise BenchError(f"{folders[0]} is a folder: the results file of that name cannot be written; "
                         f"move it away or choose another --out")
    if out_given or overwrite or append:
        return
    there = [q for q in paths if os.path.exists(q)]
    if there:
        raise BenchError(f"{there[0]} exists and --out was not given: pass --overwrite to replace "
                         f"it{', --append to add to it' if append is not None else ''}, or --out DIR "
                         f"to write elsewhere")


def output_prefix(out: str, device: str, device_name: str, loss: str = "clip",
                  tag: str = "") -> str:
    """``<out>/<device>-<device slug>[-<loss>][-<tag>]``: the stem of a run's files.

    The loss is left out for ``clip``, whose result files predate the other losses."""
    stem = f"{device}-{slug(device_name)}"
    if loss != "clip":
        stem += f"-{slug(loss)}"
    if tag:
        stem += f"-{slug(tag)}"
    return os.path.join(out, stem)


def _replace_with(path: str, fill) -> None:
    """``fill(tmp)`` writes ``path + ".tmp"``, which then replaces ``path``; the temporary file
    is removed when either step fails (never half a file, never a stray .tmp)."""
    tmp = path + ".tmp"
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    def fill(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _replace_with(path, fill)


def check_out_dir(parser, out: str) -> None:
    """``--out``: a directory that exists or can be made, and is writable; else the parser's
    one-line error, before anything is measured."""
    from .._fileio import writable_dir_problem  # noqa: PLC0415
    why = writable_dir_problem(out)
    if why:
        parser.error(f"--out {out!r}: {why}")


def write_csv(rows: list[dict], path: str, fields: list[str] | None = None) -> None:
    def fill(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields or CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)
    _replace_with(path, fill)


def read_csv(path: str) -> list[dict]:
    """Rows of a result CSV; files written before the ``loss`` column read as clip, those
    before the ``cpu`` column (family, model, vector extension) with it empty."""
    return read_table(path)[1]


def read_table(path: str) -> tuple[list[str], list[dict]]:
    """(the header as the file has it, rows as :func:`read_csv` gives them). The rows gain a
    ``loss`` column the file may lack, so a check of what the file holds reads the header."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    for r in rows:
        r.setdefault("loss", "clip")
        r["loss"] = r["loss"] or "clip"
        r.setdefault("cpu", "")
    return columns, rows


def processor_notes(rows: list[dict], info: dict, device: str, threads: int | None) -> list[str]:
    """Header lines of a CPU run: the processor's family, model and vector extension (per
    row: rows merged by --append from another machine of the same name say theirs), and a
    warning where the threads outnumber the cores."""
    if device != "cpu":
        return []
    lines = []
    # The rows' own (this run's where it wrote none: all skipped, or stopped before the first)
    cpus = dict.fromkeys([r.get("cpu", "") for r in rows] or [info.get("cpu", "")])
    if len(cpus) == 1 and next(iter(cpus)):
        lines.append(f"- processor: {next(iter(cpus))}.")
    elif len(cpus) > 1:
        lines.append("- processor (each row's in the CSV's `cpu` column): "
                     + "; ".join(c or "not recorded" for c in cpus) + ".")
    if w := threads_warning(threads):
        lines.append(f"- warning: {w}.")
    return lines


def _f(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def num(v, fmt: str) -> str:
    x = _f(v)
    return "" if x is None else format(x, fmt)


def _ratio(a, b) -> str:
    a, b = _f(a), _f(b)
    return f"{a / b:.3g}" if a and b else ""


def derive(rows: list[dict]) -> None:
    """Fill GFLOP/s and the ratios to the floor and to the naive peer, in place."""
    # Peers are paired within one problem and one thread count (rows --append kept from other
    # runs may have run on other threads; the floor and naive peers do not depend on the
    # commit).
    ok = {(r["loss"], r["method"], int(r["N"]), int(r["D"]), r["dtype"], str(r.get("threads", ""))): r
          for r in rows if str(r.get("status", "")) == "ok"}
    for r in rows:
        n, d = int(r["N"]), int(r["D"])
        for k in ("fwd_gflops", "fwd_bwd_gflops", "x_floor_fwd", "x_floor_fwd_bwd",
                  "x_naive_fwd", "x_naive_fwd_bwd"):
            r[k] = ""
        if r.get("status") != "ok":
            continue
        spec = get_loss(r["loss"])
        fwd, tot = _f(r["fwd_ms"]), _f(r["fwd_bwd_ms"])
        if fwd and not _all_in_forward(r):
            r["fwd_gflops"] = f"{fwd_flop(spec, n, d) / (fwd * 1e-3) / 1e9:.4g}"
        if tot:
            r["fwd_bwd_gflops"] = f"{fwd_bwd_flop(spec, n, d) / (tot * 1e-3) / 1e9:.4g}"
        for peer, key in ((FLOOR, "x_floor"), (NAIVE, "x_naive")):
            p = ok.get((r["loss"], peer, n, d, r["dtype"], str(r.get("threads", ""))))
            if p is not None:
                if not _all_in_forward(p):
                    r[key + "_fwd"] = _ratio(fwd, p["fwd_ms"])
                r[key + "_fwd_bwd"] = _ratio(tot, p["fwd_bwd_ms"])


def _all_in_forward(r: dict) -> bool:
    """A floor row whose forward ran all its products (a one-pass loss on row chunks): no
    forward of one X·Yᵀ to count FLOP for or compare with."""
    return r["method"] == FLOOR and ALL_IN_FORWARD in str(r.get("impl", ""))


def derive_overhead(rows: list[dict], peer: str = NAIVE) -> None:
    """Fill the ratios of per-call times to the ``peer`` method's, in place."""
    def case(r):        # what the peer must share: the same problem (and group size)
        return int(r["N"]), str(r.get("D", "")), str(r.get("dtype", "")), str(r.get("world", ""))
    ok = {(r["method"], *case(r)): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        p = ok.get((peer, *case(r))) if r.get("status") == "ok" else None
        r["x_naive_fwd"] = _ratio(r["fwd_us"], p["fwd_us"]) if p else ""
        r["x_naive_fwd_bwd"] = _ratio(r["fwd_bwd_us"], p["fwd_bwd_us"]) if p else ""


def _flops_unit(device: str) -> tuple[str, float]:
    return ("TFLOP/s", 1e3) if device == "cuda" else ("GFLOP/s", 1.0)


def threads_text(t) -> str:
    """"1 thread", "2 threads" (a count as an int or as the CSV's string)."""
    return f"{t} thread{'' if str(t) == '1' else 's'}"


def method_label(r: dict, rows: list[dict]) -> str:
    """The row's method, with its CPU thread count where ``rows`` (a table ``--append`` merged)
    hold several: "cpu, 1 thread" beside "cpu, 2 threads"."""
    counts = {str(x.get("threads") or "") for x in rows}
    t = str(r.get("threads") or "")
    if len(counts) < 2 or not t:
        return r["method"]
    return f"{r['method']}, {threads_text(t)}"


def _method_order(rows: list[dict]) -> dict[str, int]:
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r["method"], len(order))
    return order


def write_markdown(rows: list[dict], info: dict, cfg, path: str, started: str) -> None:
    """Header (device, versions, settings, FLOP model), then one table per (dtype, D).

    ``cfg``: the run's settings (``fastclip.bench.contrastive_loss.Config``)."""
    spec = get_loss(cfg.loss)
    unit, div = _flops_unit(cfg.device)
    tf32 = ("on" if cfg.allow_tf32 else "off") if cfg.device == "cuda" else "n/a"
    naive_desc = next((r["impl"] for r in rows if r["method"] == NAIVE and r.get("impl")), "")
    p = spec.floor_products
    lines = [
        f"# fastclip {spec.name} loss ({spec.title}): {cfg.device} ({info['device_name']})",
        "",
        f"- started {started}; fastclip {info['fastclip']} (commit {info['commit']}), "
        f"torch {info['torch']}, triton {info['triton'] or 'none'}"
        + (f", {threads_text(cfg.threads)}; load average at start {info['load']} (other work on "
           f"the machine inflates CPU times)" if cfg.device == "cpu" else "") + ".",
        *processor_notes(rows, info, cfg.device, cfg.threads),
        f"- memory budget {gb(cfg.max_mem_bytes)} (methods estimated above it are "
        f"skipped); fp32 matmul TF32: {tf32}.",
        "- time: median over `reps` training steps (forward timed inside the step, autograd on); "
        + ("CUDA events after a full-size warm-up." if cfg.device == "cuda" else
           "time.perf_counter after a small warm-up; each measurement in a fresh subprocess "
           "(peak memory = peak resident set minus the resident set once the inputs exist)."
           if cfg.isolate else "time.perf_counter after a small warm-up, in one process."),
        "- peak extra = peak memory during one forward+backward beyond the inputs and their "
        "gradients.",
        f"- {unit}: effective, 2N²D FLOP for fwd and {2 * p}N²D for fwd+bwd whatever the "
        "method does. × floor = time / floor's time (fwd: one X·Yᵀ; fwd+bwd: the floor's "
        f"{p} products); × naive = time / naive's time.",
        f"- floor: {p} torch.matmul of the loss's shapes (X·Yᵀ{' twice' if p == 4 else ''}, "
        "G·Y, Gᵀ·X); on row chunks where one N×N buffer would not fit (see impl)"
        + ("; on row chunks the three products of each chunk run together in its forward, "
           "which then has no fwd GFLOP/s or × floor fwd." if p == 3 else "."),
    ]
    runs = sorted({(r.get("commit", ""), str(r.get("threads", ""))) for r in rows})
    if len(runs) > 1:
        lines.append("- rows from several runs (" + "; ".join(f"commit {c}, {threads_text(t)}" for c, t in runs)
                     + "): each row's commit, threads and timestamp are in the CSV; ratios pair rows "
                     "of the same thread count.")
    if naive_desc:
        lines.append(f"- naive: {naive_desc}.")
    for m, impl in sorted({(r["method"], r["impl"]) for r in rows if r.get("impl")
                           and r["method"] not in (NAIVE, FLOOR)}):
        lines.append(f"- {m}: {impl}.")
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dtype"], int(r["D"])), []).append(r)
    order = _method_order(rows)
    for (dt, d), rs in groups.items():
        rs = sorted(rs, key=lambda r: (int(r["N"]), order[r["method"]], _f(r.get("threads")) or 0))
        lines += ["", f"## {dt}, D={d}", "",
                  f"| N | method | fwd ms | fwd+bwd ms | peak extra MiB | fwd+bwd {unit} "
                  "| × floor fwd | × floor fwd+bwd | × naive fwd+bwd | reps | status |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rs:
            gf = _f(r.get("fwd_bwd_gflops"))
            lines.append(
                f"| {r['N']} | {method_label(r, rows)} | {num(r['fwd_ms'], '.4g')} | "
                f"{num(r['fwd_bwd_ms'], '.4g')} | {num(r['peak_extra_mb'], '.1f')} | "
                f"{'' if gf is None else format(gf / div, '.4g')} | {r['x_floor_fwd']} | "
                f"{r['x_floor_fwd_bwd']} | {r['x_naive_fwd_bwd']} | {r.get('reps', '')} | "
                f"{'' if r['status'] == 'ok' else r['status']} |")
    write_text(path, "\n".join(lines) + "\n")


def summary_table(rows: list[dict]) -> str:
    """A compact fixed-width table of every row (printed last by a run)."""
    device = rows[0]["device"] if rows else "cpu"
    unit, div = _flops_unit(device)
    labels = [method_label(r, rows) for r in rows]
    w = max([9, *map(len, labels)])     # "reference, 1 thread" (--append) overran a fixed 9
    hdr = (f"{'dtype':<5} {'D':>5} {'N':>8} {'method':<{w}} {'fwd ms':>10} {'fwd+bwd ms':>11} "
           f"{'peak MiB':>9} {unit:>8} {'x floor':>8} {'x naive':>8}  status")
    out = [hdr, "-" * len(hdr)]
    for r, label in zip(rows, labels):
        gf = _f(r.get("fwd_bwd_gflops"))
        st = r["status"]
        out.append(f"{r['dtype']:<5} {r['D']:>5} {r['N']:>8} {label:<{w}} "
                   f"{num(r['fwd_ms'], '.4g'):>10} {num(r['fwd_bwd_ms'], '.4g'):>11} "
                   f"{num(r['peak_extra_mb'], '.1f'):>9} "
                   f"{'' if gf is None else format(gf / div, '.4g'):>8} "
                   f"{r.get('x_floor_fwd_bwd', ''):>8} {r.get('x_naive_fwd_bwd', ''):>8}  "
                   f"{'ok' if st == 'ok' else st[:48]}")
    return "\n".join(out)


def overhead_table(rows: list[dict], md: bool = True, peer: str = NAIVE) -> str:
    """Per-call times against N: one row per (N, method); markdown or fixed width.
    ``× <peer>``: time over the ``peer`` method's at the same N."""
    order = _method_order(rows)
    rs = sorted(rows, key=lambda r: (int(r["N"]), order[r["method"]]))
    if md:
        out = [f"| N | method | fwd µs | fwd+bwd µs | × {peer} fwd | × {peer} fwd+bwd "
               "| min fwd µs | min fwd+bwd µs | calls | status |",
               "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rs:
            out.append(f"| {r['N']} | {r['method']} | {num(r['fwd_us'], '.0f')} | "
                       f"{num(r['fwd_bwd_us'], '.0f')} | {r['x_naive_fwd']} | "
                       f"{r['x_naive_fwd_bwd']} | {num(r.get('fwd_us_min'), '.0f')} | "
                       f"{num(r.get('fwd_bwd_us_min'), '.0f')} | {r['calls']} | "
                       f"{'' if r['status'] == 'ok' else r['status']} |")
        return "\n".join(out)
    xf, xt = f"x{peer[:7]} f", f"x{peer[:7]} fb"       # x naive over fwd, over fwd+bwd
    # (the console table holds every (dtype, D): they are columns here, sections in markdown)
    rs = sorted(rs, key=lambda r: (str(r.get("dtype", "")), int(r.get("D") or 0)))
    hdr = (f"{'dtype':<5} {'D':>5} {'N':>6} {'method':<10} {'fwd us':>9} {'fwd+bwd us':>11} {xf:>10} "
           f"{xt:>10} {'calls':>6}  status")
    out = [hdr, "-" * len(hdr)]
    for r in rs:
        out.append(f"{str(r.get('dtype', '')):<5} {str(r.get('D', '')):>5} "
                   f"{r['N']:>6} {r['method']:<10} {num(r['fwd_us'], '.0f'):>9} "
                   f"{num(r['fwd_bwd_us'], '.0f'):>11} {r['x_naive_fwd']:>10} "
                   f"{r['x_naive_fwd_bwd']:>10} {r['calls']:>6}  "
                   f"{'ok' if r['status'] == 'ok' else r['status'][:48]}")
    return "\n".join(out)


def write_overhead_markdown(rows: list[dict], title: str, notes: list[str], path: str,
                            peer: str = NAIVE) -> None:
    """``title``, the ``notes`` as a list, then :func:`overhead_table` (one per world
    size when the rows have a ``world`` column)."""
    lines = [f"# {title}", "", *(f"- {n}" for n in notes)]
    worlds = list(dict.fromkeys(str(r.get("world", "")) for r in rows))
    cases = list(dict.fromkeys((str(r.get("dtype", "")), str(r.get("D", ""))) for r in rows))
    for w in worlds:
        if w:
            lines += ["", f"## W = {w}"]
        for dt, d in cases:
            rs = [r for r in rows if str(r.get("world", "")) == w
                  and (str(r.get("dtype", "")), str(r.get("D", ""))) == (dt, d)]
            if not rs:
                continue
            if len(cases) > 1:      # one table per (dtype, D), as the sweep's tables
                lines += ["", f"{'###' if w else '##'} {dt}, D={d}"]
            lines += ["", overhead_table(rs, peer=peer)]
    write_text(path, "\n".join(lines) + "\n")


# What --summarize needs of a file. The header is judged as the file has it: read_csv gives
# every row a ``loss`` column (files from before it read as clip), so a file without one
# still passes, and a foreign file's columns are reported as they are.
SWEEP_COLUMNS = [c for c in CSV_FIELDS if c not in ("loss", "cpu")]   # (both added later)
OVERHEAD_COLUMNS = ["method", "N", "fwd_us", "fwd_bwd_us"]
_NOT_OURS = "not a results CSV of `fastclip bench`"
_ELSEWHERE = "; distributed and tokenizer results have their own markdown tables"


def table_names(cols: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(c) for c in cols[:limit])
    return f"[{shown}{f', ... ({len(cols)} in all)' if len(cols) > limit else ''}]"


def table_problem(columns: list[str], rows: list[dict]) -> tuple[str, bool]:
    """(why ``--summarize`` (or the plot) cannot table this file, "" when it can; whether it is an
    --overhead table) from the file's own header and its rows."""
    if not columns:
        return f"{_NOT_OURS}: the file is empty", False
    have = set(columns)
    if any(None in r for r in rows):       # csv puts a long row's extra fields under None
        return (f"{_NOT_OURS}: rows of uneven length (e.g. a markdown table) under the header "
                f"{table_names(columns)}{_ELSEWHERE}"), False
    short = next((k for k, r in enumerate(rows) if None in r.values()), None)   # missing fields: None
    if short is not None:
        return (f"row {short + 1} (line {short + 2}) has {sum(v is not None for v in rows[short].values())} "
                f"of the header's {len(columns)} fields: a truncated or edited file?"), False
    if "world" in have:
        return (f"{_NOT_OURS}: its columns {table_names(columns)} include 'world', as a `fastclip "
                f"bench distributed` table's do{_ELSEWHERE}"), False
    kinds = [(name, [c for c in need if c not in have])
             for name, need in (("a sweep's table", SWEEP_COLUMNS),
                                ("an --overhead table", OVERHEAD_COLUMNS))]
    overhead = not kinds[1][1]
    if overhead or not kinds[0][1]:
        if not rows:
            return f"no rows to summarize (only the header {table_names(columns)})", False
        return "", overhead
    # Neither kind: the nearer one's missing columns in full, the other's as a count.
    (near, missing), (far, far_missing) = sorted(kinds, key=lambda k: len(k[1]))
    return (f"{_NOT_OURS}: its columns are {table_names(columns)}; the columns {near} requires, "
            f"{table_names(missing, len(missing))}, are missing ({far} requires "
            f"{len(far_missing)} more){_ELSEWHERE}"), False
