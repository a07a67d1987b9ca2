"""``outlierd demo --events``: the demo on raw payment events.

1. generate a card-payments history as raw events (card, merchant, category code, amount, place,
   time), replay it through the feature spec shipped in the repository
   (``data/payments.features.json``: the card's spend windows, new merchants, time of day, distance
   and speed from its previous payment), train the default detector on those features and publish it
   with the spec in its artifact;
2. start ``outlierd serve`` on 127.0.0.1 (the feature state checkpointed in the registry directory);
3. stream fresh raw events with injected frauds of four kinds (impossible travel, card testing,
   night sprees, cash-outs) through ``ScoreStream`` as Arrow IPC messages: the server computes the
   features from each card's state and scores them;
   The history goes through the server first, so each card's state is where training left it.
4. print recall per fraud kind (events flagged, and incidents with at least one flagged event),
   precision, the alert rate and the throughput; stop the server.

The features come from the spec, not from the generator: the generator only writes events.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pyarrow.parquet as pq

from outlierd.core.errors import InvalidInputError

from .demo import MODEL, ServerProcess, _Printer
from .payments import FRAUD_KINDS, with_frauds

SPEC = Path(__file__).resolve().parents[1] / "data" / "payments.features.json"


@dataclass
class EventsDemoSummary:
    events: int = 0
    flagged: int = 0
    seconds: float = 0.0
    recall: dict[str, float] = field(default_factory=dict)
    incidents: dict[str, tuple[int, int]] = field(default_factory=dict)
    precision: float = float("nan")
    ok: bool = False


def run_events_demo(registry: str | os.PathLike | None = None, *, records: int = 100_000, train_records: int = 100_000,
                    cards: int = 2000, incidents: int = 200, batch: int = 256, alert_rate: float = 0.01, port: int = 0,
                    seed: int = 0, out: TextIO | None = None) -> EventsDemoSummary:
    """Train on raw events, serve them, stream fresh events with frauds; returns the summary."""
    from outlierd.server.client import ScorerClient, events_request
    from outlierd.training.train import train

    if records < 1000 or train_records < 1000:
        raise InvalidInputError(f"--records and --train-records must be at least 1000 with --events; got {records}, {train_records}")
    say = _Printer(out if out is not None else sys.stdout)
    temporary = registry is None
    root = Path(tempfile.mkdtemp(prefix="outlierd-demo-events-")) if temporary else Path(registry)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    summary = EventsDemoSummary()
    server = None
    try:
        history, _, _ = with_frauds(train_records, cards, incidents=0, days=20, seed=seed)
        pq.write_table(history, root / "history.parquet")
        say(f"training on {train_records:,} raw payment events of {cards:,} cards, features from {SPEC.name}")
        res = train(root / "history.parquet", root, MODEL, events_spec=SPEC, alias="champion", alert_rate=alert_rate, seed=seed,
                    quiet=True)
        say(f"  published {MODEL} version {res.version} ({res.n_features} features, threshold {res.threshold:.4g})")
        stream, kinds, incident = with_frauds(records, cards, incidents=incidents, days=10, seed=seed + 1)
        # the stream continues the history in time: shift it after the last training event
        shift = float(history.column("ts").to_numpy().max()) - float(stream.column("ts").to_numpy().min()) + 60.0
        import pyarrow as pa
        import pyarrow.compute as pc

        stream = stream.set_column(stream.column_names.index("ts"), "ts", pc.add(stream.column("ts"), pa.scalar(shift)))
        server = ServerProcess(root, port, root / "server.log", say)
        server.command = lambda: [*ServerProcess.command(server), "--feature-state-dir", str(root / "state"),  # type: ignore[method-assign]
                                  "--no-capture"]
        server.start()
        server.wait_ready()
        say(f"streaming {stream.num_rows:,} raw events ({int((kinds != '').sum())} in {incidents} injected frauds) in "
            f"messages of {batch}")
        with ScorerClient(f"127.0.0.1:{server.port}", timeout=None) as client:  # the cards' state as of the history's end
            warm = (events_request(history.slice(s, 4096), request_id=s) for s in range(0, history.num_rows, 4096))
            for resp in client.stub.ScoreStream(warm):
                if resp.error:
                    raise InvalidInputError(f"the server refused a message: {resp.error}")
        flags = np.zeros(stream.num_rows, dtype=bool)
        t0 = time.perf_counter()
        reqs = (events_request(stream.slice(s, batch), request_id=s) for s in range(0, stream.num_rows, batch))
        with ScorerClient(f"127.0.0.1:{server.port}", timeout=None) as client:
            for resp in client.stub.ScoreStream(reqs):
                if resp.error:
                    raise InvalidInputError(f"the server refused a message: {resp.error}")
                flags[resp.request_id:resp.request_id + len(resp.anomalous)] = np.asarray(resp.anomalous, dtype=bool)
        summary.seconds = time.perf_counter() - t0
        summary.events, summary.flagged = stream.num_rows, int(flags.sum())
        for kind in FRAUD_KINDS:
            m = kinds == kind
            ids = np.unique(incident[m])
            summary.recall[kind] = float(flags[m].mean()) if m.any() else float("nan")
            summary.incidents[kind] = (sum(bool(flags[incident == i].any()) for i in ids), len(ids))
        summary.precision = float((kinds[flags] != "").mean()) if flags.any() else float("nan")
        summary.ok = all(c == t for c, t in summary.incidents.values()) or min(summary.recall.values()) > 0.5
        say(f"\nscored {summary.events:,} events in {summary.seconds:.1f} s ({summary.events / summary.seconds:,.0f} events/s); "
            f"{summary.flagged:,} flagged ({summary.flagged / summary.events:.2%}), precision {summary.precision:.1%}")
        say(f"  {'fraud kind':<20}{'events flagged':>16}{'incidents caught':>20}")
        for kind in FRAUD_KINDS:
            caught, total = summary.incidents[kind]
            say(f"  {kind:<20}{summary.recall[kind]:>16.1%}{f'{caught}/{total}':>20}")
    finally:
        if server is not None:
            server.stop()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    return summary
