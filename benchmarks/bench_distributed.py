"""The sharded-loss benchmark: fastclip.distributed (gather, ring) against open_clip's.

A thin entry into ``fastclip.bench.distributed`` (also ``fastclip bench distributed``);
see benchmarks/README.md. Examples::

    python benchmarks/bench_distributed.py --mode cpu --worlds 2 4 --sizes 2048 8192 16384
    python benchmarks/bench_distributed.py --mode overhead          # W=2, N 32, 256, 1024
    python benchmarks/bench_distributed.py --mode w1 --sizes 16384 65536 --dtypes bf16 fp32
"""

import sys

from fastclip.bench.distributed import main

if __name__ == "__main__":
    sys.exit(main(prog=f"python {sys.argv[0]}"))
