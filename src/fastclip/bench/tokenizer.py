"""The tokenizer benchmark: ``fastclip.tokenize`` against the pure-Python BPE oracle.

On synthetic captions (~15 words each: a subject, a verb, an object, a tail, three
random vocabulary words; fixed seed), best of ``--reps`` runs of each stage:

* ``clean``: ftfy + HTML unescape + whitespace (shared by both paths);
* ``bpe_tokenizers``: the BPE of cleaned text by ``tokenizers`` (Rust), as ``tokenize``
  runs it;
* ``bpe_python``: the same BPE by ``SimpleTokenizer`` (pure Python);
* ``tokenize``: ``fastclip.tokenize`` end to end (cleaning, BPE, padding to a tensor);
* ``simple_tokenizer``: ``SimpleTokenizer().encode`` end to end.

Every BPE stage starts each run from a fresh tokenizer, built outside the clock, so both
paths pay their word caches alike, as a first epoch does (a warm Rust cache against a cold
Python one made the ratio: 33 ms warm, 48 ms cold for ``tokenizers`` on 3000 captions).

The ids of ``tokenize`` are checked against ``SimpleTokenizer``'s on every caption.
Writes ``<out>/tokenizer-<cpu slug>.csv`` and ``.md``; ``<out>`` defaults to
``./benchmarks/results`` when the current directory has one, else the current directory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import random
import sys
import time

from .env import cpu_name, env_info, slug, version
from .report import BenchError, add_out_args, check_out_dir, check_replace, default_out_dir, write_csv, write_text

__all__ = ["main", "synthetic_captions", "run"]

FIELDS = ["device_name", "torch", "fastclip", "commit", "python", "tokenizers", "ftfy",
          "stage", "captions", "seconds", "captions_per_s", "x_python", "reps", "timestamp"]


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of ~15 words, some with digits, punctuation and non-ASCII."""
    from fastclip.tokenizer import _vocab  # noqa: PLC0415
    rng = random.Random(seed)
    subj = ["a dog", "two cats", "a man", "the woman", "a red car", "children", "an old bicycle",
            "a bird", "a plate of food", "a group of people", "a skateboarder", "the train",
            "a laptop", "three horses"]
    verb = ["sitting on", "running across", "standing next to", "parked near", "flying over",
            "eating", "looking at", "riding", "lying under", "jumping over", "walking along",
            "holding"]
    obj = ["a wooden bench", "the beach", "a busy street", "green grass", "a snowy mountain",
           "the kitchen table", "a blue sky", "an empty field", "the river bank",
           "a crowded market", "a tall building", "a small boat"]
    tail = ["", " at night", " in the rain", " on a sunny day", " during winter",
            ", with 2 friends", " (photo)", " & smiling", " in 1999", " near the café"]
    words = [t[:-4] for t in _vocab()[0][512:-2]
             if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii()]
    return [f"{rng.choice(subj).capitalize()} {rng.choice(verb)} {rng.choice(obj)}"
            f"{rng.choice(tail)}, {' '.join(rng.choice(words) for _ in range(3))}."
            for _ in range(n)]


def _best(fn, reps: int, fresh=lambda: None):
    """Best time of ``fn(fresh())`` over ``reps`` runs; ``fresh()`` (a new tokenizer) is
    called before each run, outside the clock."""
    times, out = [], None
    for _ in range(reps):
        state = fresh()
        t0 = time.perf_counter()
        out = fn(state)
        times.append(time.perf_counter() - t0)
    return min(times), out


def run(n: int, reps: int, seed: int = 0) -> dict[str, float]:
    """{stage: best seconds} on ``n`` synthetic captions; raises if the ids disagree."""
    from fastclip.tokenizer import _PAT, SimpleTokenizer, clean_text, get_tokenizer, tokenize  # noqa: PLC0415
    caps = synthetic_captions(n, seed)

    def fresh_rust():               # tokenize() reads this process-wide, cached tokenizer
        get_tokenizer.cache_clear()
        return get_tokenizer()

    def python_bpe(st):
        return [[st.encoder[p] for w in _PAT.findall(c)
                 for p in st.bpe("".join(st.byte_encoder[b] for b in w.encode()))]
                for c in cleaned]
    out = {}
    out["clean"], cleaned = _best(lambda _: [clean_text(c) for c in caps], reps)
    out["bpe_tokenizers"], _ = _best(
        lambda tok: tok.encode_batch_fast(cleaned, add_special_tokens=False), reps, fresh_rust)
    out["bpe_python"], _ = _best(python_bpe, reps, SimpleTokenizer)
    out["tokenize"], fast = _best(lambda _: tokenize(caps), reps, fresh_rust)
    out["simple_tokenizer"], slow = _best(lambda st: [st.encode(c) for c in caps], reps,
                                          SimpleTokenizer)
    bad = [i for i, ids in enumerate(slow) if fast[i, 1:len(ids) + 1].tolist() != ids]
    if bad:
        raise RuntimeError(f"tokenize and SimpleTokenizer disagree on captions {bad[:5]}")
    return out


def main(argv: list[str] | None = None, prog: str = "fastclip bench tokenizer") -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time fastclip.tokenize (BPE in Rust through tokenizers) against the "
                    "pure-Python SimpleTokenizer on synthetic captions; write CSV and markdown.")
    p.add_argument("--captions", type=int, default=None, help="captions (default 10000)")
    p.add_argument("--reps", type=int, default=None, help="runs per stage, best kept (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="a check: 1000 captions, 1 run (unless --captions/--reps say otherwise)")
    p.add_argument("--seed", type=int, default=0)
    add_out_args(p)
    a = p.parse_args(argv)
    if a.captions is None:
        a.captions = 1000 if a.quick else 10_000
    if a.reps is None:
        a.reps = 1 if a.quick else 3
    if a.captions < 1 or a.reps < 1:
        p.error(f"--captions and --reps must be >= 1, got {a.captions} and {a.reps}")
    out = a.out if a.out is not None else default_out_dir()
    check_out_dir(p, out)
    prefix = os.path.join(out, f"tokenizer-{slug(cpu_name())}")
    try:
        check_replace([prefix + ".csv", prefix + ".md"], a.out is not None, a.overwrite)
    except BenchError as e:
        p.error(str(e))
    info = env_info("cpu")
    try:
        t = run(a.captions, a.reps, a.seed)
    except KeyboardInterrupt as e:
        from ..cli import stopped  # noqa: PLC0415
        return stopped(e, "nothing written")
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    pair = {"bpe_tokenizers": "bpe_python", "tokenize": "simple_tokenizer"}
    rows = [dict(info, tokenizers=version("tokenizers"), ftfy=version("ftfy"), stage=k,
                 captions=a.captions, seconds=f"{v:.4f}",
                 captions_per_s=f"{a.captions / v:.0f}",
                 x_python=f"{t[pair[k]] / v:.2f}" if k in pair else "", reps=a.reps,
                 timestamp=stamp) for k, v in t.items()]
    os.makedirs(out, exist_ok=True)
    write_csv(rows, prefix + ".csv", FIELDS)
    lines = [f"# fastclip tokenizer: {info['device_name']}", "",
             f"- fastclip {info['fastclip']} (commit {info['commit']}), tokenizers "
             f"{rows[0]['tokenizers']}, ftfy {rows[0]['ftfy']}, Python {info['python']}; load "
             f"average at start {info['load']}.",
             f"- {a.captions} synthetic captions of ~15 words (seed {a.seed}); best of "
             f"{a.reps} runs per stage; the ids of both paths agree on every caption.",
             "- clean: ftfy + HTML + whitespace (both paths pay it); bpe_*: the BPE of cleaned "
             "text alone; tokenize / simple_tokenizer: end to end. × python = the pure-Python "
             "path's time over this one.", "",
             "| stage | seconds | captions/s | × python |", "|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['seconds']} | {r['captions_per_s']} | {r['x_python']} |"
              for r in rows]
    write_text(prefix + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]))
    print(f"wrote {prefix}.csv and {prefix}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
