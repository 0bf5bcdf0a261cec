"""Contrastive-loss microbenchmark: every fastclip backend, its peers and the GEMM floor.

A thin entry point; the harness is ``fastclip.bench.contrastive_loss`` (also reachable as
``fastclip bench``). See benchmarks/README.md. Examples::

    python benchmarks/bench_contrastive_loss.py --device cpu --quick
    python benchmarks/bench_contrastive_loss.py --device cuda --dtypes bf16 --dims 512
"""

import sys

from fastclip.bench.contrastive_loss import main

if __name__ == "__main__":
    sys.exit(main())
