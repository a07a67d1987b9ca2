"""``outlierd demo`` (the default since raw events came in; ``--events`` says the same, ``--vectors``
runs the older demo on ready-made feature vectors): the demo on raw payment events.

1. generate a card-payments history as raw events (card, merchant, category code, amount, place,
   time), replay it through the feature spec shipped in the repository
   (``data/payments.features.json``, shipped in the package as ``outlierd/payments.features.json``: the card's spend windows, new merchants, time of day, distance
   and speed from its previous payment), train the default detector on those features and publish it
   with the spec in its artifact;
2. start ``outlierd serve`` on 127.0.0.1 (the feature state checkpointed in the registry directory);
3. stream fresh raw events with injected frauds of four kinds (impossible travel, card testing,
   night sprees, cash-outs) through ``ScoreStream`` as Arrow IPC messages: the server computes the
   features from each card's state and scores them;
   The history goes through the server first, so each card's state is where training left it.
4. print recall per fraud kind (events flagged, and incidents with at least one flagged event),
   precision, the alert rate and the throughput; stop the server.

Bounded: ``records`` streamed events at most, and the stream stops at ``seconds``. Every file (the
events, the server log, the feature state) lives in ``<registry>/.demo-data``; the feature state
starts empty on every run, so a kept registry can be demoed again.

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

from .demo import MODEL, ServerProcess, _check_port_free, _Printer
from .payments import FRAUD_KINDS, with_frauds

# the repository's data/payments.features.json, shipped in the package so that an installed CLI has it
SPEC = Path(__file__).resolve().parent / "payments.features.json"


@dataclass
class EventsDemoSummary:
    events: int = 0
    flagged: int = 0
    seconds: float = 0.0
    recall: dict[str, float] = field(default_factory=dict)
    incidents: dict[str, tuple[int, int]] = field(default_factory=dict)
    precision: float = float("nan")
    incidents_injected: int = 0
    ok: bool = False


# events per incident, on average over the four kinds (1 + 11 + 6 + 4, over 4): turns --anomaly-rate
# (a share of events, as in the vector demo) into a number of incidents
_EVENTS_PER_INCIDENT = 5.5


def run_events_demo(registry: str | os.PathLike | None = None, *, records: int = 100_000, train_records: int = 100_000,
                    cards: int = 2000, incidents: int | None = 200, anomaly_rate: float | None = None,
                    seconds: float = float("inf"), batch: int = 256, alert_rate: float = 0.01, port: int = 0,
                    seed: int = 0, out: TextIO | None = None) -> EventsDemoSummary:
    """Train on raw events, serve them, stream fresh events with frauds; returns the summary.

    ``anomaly_rate`` (a share of the streamed events), when given, sets the number of injected
    incidents instead of ``incidents``. The stream holds ``records`` payments plus the incidents'
    events, and stops early at ``seconds``."""
    from outlierd.server.client import ScorerClient, events_request
    from outlierd.training.train import train

    if records < 1000 or train_records < 1000:
        raise InvalidInputError(f"--records and --train-records must be at least 1000; got {records}, {train_records}")
    if not seconds > 0:
        raise InvalidInputError(f"--seconds must be > 0; got {seconds}")
    if batch < 1:
        raise InvalidInputError(f"--batch must be >= 1; got {batch}")
    if anomaly_rate is not None:
        if not 0.0 <= anomaly_rate < 0.5:
            raise InvalidInputError(f"--anomaly-rate must be in [0, 0.5); got {anomaly_rate}")
        incidents = round(anomaly_rate * records / _EVENTS_PER_INCIDENT)
    incidents = max(int(incidents or 0), 0)
    if not 0 <= port < 65536:
        raise InvalidInputError(f"--port must be in 0..65535; got {port}")
    if port:
        _check_port_free(port)  # before any work
    say = _Printer(out if out is not None else sys.stdout)
    temporary = registry is None
    root = Path(tempfile.mkdtemp(prefix="outlierd-demo-events-")) if temporary else Path(registry)  # type: ignore[arg-type]
    data = root / ".demo-data"  # not a model name the registry lists (names cannot start with '.')
    shutil.rmtree(data / "state", ignore_errors=True)  # a fresh feature state: the history is replayed into it below
    data.mkdir(parents=True, exist_ok=True)
    summary = EventsDemoSummary(incidents_injected=incidents)
    server = None
    try:
        say(f"outlierd demo: raw card-payment events; registry {root}{' (temporary)' if temporary else ''}")
        history, _, _ = with_frauds(train_records, cards, incidents=0, days=20, seed=seed)
        pq.write_table(history, data / "history.parquet")
        say(f"training on {train_records:,} raw payment events of {cards:,} cards, features from {SPEC.name}")
        res = train(data / "history.parquet", root, MODEL, events_spec=SPEC, alias="champion", alert_rate=alert_rate, seed=seed,
                    quiet=True)
        say(f"  published {MODEL} version {res.version} ({res.n_features} features, threshold {res.threshold:.4g})")
        stream, kinds, incident = with_frauds(records, cards, incidents=incidents, days=10, seed=seed + 1)
        # the stream continues the history in time: shift it after the last training event
        shift = float(history.column("ts").to_numpy().max()) - float(stream.column("ts").to_numpy().min()) + 60.0
        import pyarrow as pa
        import pyarrow.compute as pc

        stream = stream.set_column(stream.column_names.index("ts"), "ts", pc.add(stream.column("ts"), pa.scalar(shift)))
        server = ServerProcess(root, port, data / "server.log", say)
        server.command = lambda: [*ServerProcess.command(server), "--feature-state-dir", str(data / "state"),  # type: ignore[method-assign]
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
        deadline = t0 + seconds
        sent = 0

        def requests():  # until the stream's end or the deadline
            nonlocal sent
            for s in range(0, stream.num_rows, batch):
                if time.perf_counter() >= deadline:
                    return
                sent = min(s + batch, stream.num_rows)
                yield events_request(stream.slice(s, batch), request_id=s)

        with ScorerClient(f"127.0.0.1:{server.port}", timeout=None) as client:
            for resp in client.stub.ScoreStream(requests()):
                if resp.error:
                    raise InvalidInputError(f"the server refused a message: {resp.error}")
                flags[resp.request_id:resp.request_id + len(resp.anomalous)] = np.asarray(resp.anomalous, dtype=bool)
        summary.seconds = time.perf_counter() - t0
        if sent < stream.num_rows:  # the deadline came first: judge only what was streamed
            say(f"  --seconds reached: {sent:,} of {stream.num_rows:,} events streamed")
            stream, kinds, incident, flags = stream.slice(0, sent), kinds[:sent], incident[:sent], flags[:sent]
        summary.events, summary.flagged = stream.num_rows, int(flags.sum())
        for kind in FRAUD_KINDS:
            m = kinds == kind
            ids = np.unique(incident[m])
            summary.recall[kind] = float(flags[m].mean()) if m.any() else float("nan")
            summary.incidents[kind] = (sum(bool(flags[incident == i].any()) for i in ids), len(ids))
        summary.precision = float((kinds[flags] != "").mean()) if flags.any() else float("nan")
        recalls = [r for r in summary.recall.values() if r == r]  # a kind with no streamed event has no recall
        summary.ok = bool(recalls) and (all(c == t for c, t in summary.incidents.values()) or min(recalls) > 0.5)
        say(f"\nscored {summary.events:,} events in {summary.seconds:.1f} s ({summary.events / summary.seconds:,.0f} events/s); "
            f"{summary.flagged:,} flagged ({summary.flagged / summary.events:.2%}), precision {summary.precision:.1%}")
        say(f"  {'fraud kind':<20}{'events flagged':>16}{'incidents caught':>20}")
        for kind in FRAUD_KINDS:
            caught, total = summary.incidents[kind]
            say(f"  {kind:<20}{summary.recall[kind]:>16.1%}{f'{caught}/{total}':>20}")
        say(f"demo {'OK' if summary.ok else 'INCOMPLETE'}" + ("" if summary.ok else ": some fraud kind was mostly missed"))
    finally:
        if server is not None:
            server.stop()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    return summary
