"""fastclip's microbenchmarks (design.md §6): numbers live here, never in timed tests.

``fastclip.bench.contrastive_loss``: every backend of the fused contrastive loss side
by side with its peers (the naive formula, the chunked PyTorch form, ``inf-cl`` on GPU)
and the GEMM floor measured in the same run; ``main(argv)`` is what ``fastclip bench``
and ``benchmarks/bench_contrastive_loss.py`` call.
``fastclip.bench.plot``: the PNG plots of a result CSV (matplotlib, optional).

Nothing is imported here: ``python -m fastclip.bench.contrastive_loss`` (also used for
the per-measurement subprocesses on the CPU) must not find the module half-loaded.
"""
