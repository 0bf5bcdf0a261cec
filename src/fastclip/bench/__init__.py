"""fastclip's benchmarks (docs/design.md §6): numbers live here, never in timed tests.

Runners, one per benchmark (each has ``main(argv)``; ``fastclip bench [NAME] ...`` and
the scripts in ``benchmarks/`` call them):

* ``contrastive_loss`` (``loss``, the default): a fused loss (``--loss``), every
  fastclip backend beside open_clip's loss, the loss's other peers and the matmul
  floor, with peak memory; ``--overhead``: per-call times at small N.
* ``distributed``: the sharded loss on W gloo ranks (time, memory, per-call overhead)
  and the single-device cost of the sharded path.
* ``tokenizer``: ``fastclip.tokenize`` against the pure-Python BPE.

Shared parts, one concern each: ``env`` (device, versions, commit), ``measure``
(clocks, repetitions, peak memory, subprocesses, ports), ``methods`` (the per-loss
table of what runs), ``report`` (file names, CSV, markdown), ``plot`` (PNG plots).

Nothing is imported at package import: ``python -m fastclip.bench.contrastive_loss``
(also the per-measurement subprocess on the CPU) must not find the package half-loaded.
"""

# name on the command line -> module with main(argv)
BENCHMARKS = {"loss": "fastclip.bench.contrastive_loss",
              "distributed": "fastclip.bench.distributed",
              "tokenizer": "fastclip.bench.tokenizer"}


def main(argv: list[str]) -> int:
    """``fastclip bench [loss|distributed|tokenizer] ARGS``: the named benchmark's
    ``main(ARGS)``; without a name, the loss benchmark."""
    import importlib  # noqa: PLC0415
    name = "loss"
    if argv and argv[0] in BENCHMARKS:
        name, argv = argv[0], argv[1:]
    return int(importlib.import_module(BENCHMARKS[name]).main(list(argv)) or 0)
