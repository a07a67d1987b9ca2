"""The load generator, kept at this path for the benchmarks and scripts that run it: the code is
``outlierd.bench.loadgen`` (also what ``outlierd bench`` runs).

    python benchmarks/loadgen.py --target 127.0.0.1:50051 --data X.npy --mode stream --records 256
"""

from __future__ import annotations

import sys

from outlierd.bench.loadgen import build_messages, main, parse_args, run_stream, run_unary  # noqa: F401 - re-exported

if __name__ == "__main__":
    sys.exit(main())
