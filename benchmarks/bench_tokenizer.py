"""The tokenizer benchmark: fastclip.tokenize against the pure-Python BPE.

A thin entry into ``fastclip.bench.tokenizer`` (also ``fastclip bench tokenizer``); see
benchmarks/README.md. Example::

    python benchmarks/bench_tokenizer.py            # 10,000 captions, best of 3
"""

import sys

from fastclip.bench.tokenizer import main

if __name__ == "__main__":
    sys.exit(main(prog=f"python {sys.argv[0]}"))
