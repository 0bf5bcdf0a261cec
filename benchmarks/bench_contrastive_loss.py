"""The loss benchmark: every fastclip backend beside its peers and the matmul floor.

A thin entry into ``fastclip.bench.contrastive_loss`` (also ``fastclip bench``); see
benchmarks/README.md. Results go to ``--out`` (default ./benchmarks/results when run from
the repository root, where files of recorded runs are replaced only with ``--overwrite``
or merged with ``--append``). Examples::

    python benchmarks/bench_contrastive_loss.py --device cpu --quick --out /tmp/bench
    python benchmarks/bench_contrastive_loss.py --device cpu --overhead
    python benchmarks/bench_contrastive_loss.py --device cuda --dtypes bf16 --dims 512
"""

import sys

from fastclip.bench.contrastive_loss import main

if __name__ == "__main__":
    sys.exit(main(prog=f"python {sys.argv[0]}"))
