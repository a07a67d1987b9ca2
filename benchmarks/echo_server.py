"""The transport floor, kept at this path for the benchmarks and scripts that run it: the code is
``outlierd.bench.echo`` (also what ``outlierd bench`` runs).

    python benchmarks/echo_server.py --port 50099 [--host 127.0.0.1]
"""

from __future__ import annotations

import sys

from outlierd.bench.echo import EchoScorer, main, serve  # noqa: F401 - re-exported

if __name__ == "__main__":
    sys.exit(main())
