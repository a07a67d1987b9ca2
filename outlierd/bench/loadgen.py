"""Load generator for ``outlierd.v1.Scorer`` servers; runs in its own process, prints one JSON line.

Requests are built once from the rows of a ``.npy`` file with ``server.client.request`` (the same
encoding every outlierd client uses), serialized once, and the bytes are reused for every call: the
channels are called with no serializer and no deserializer, so the timed loop pays for neither.

* ``--mode stream``: ``--streams`` concurrent ScoreStream calls, each on its own channel (its own
  TCP connection), each keeping at most ``--window`` messages in flight. Result: records/s.
* ``--mode unary``: ``--concurrency`` tasks calling Score back to back on one shared channel.
  Result: latency percentiles per call (client-side, from the write to the response) and calls/s.

Bounded in time and count: ``--warmup`` seconds first (every response is parsed and checked: no
``error``, one score per record, the request_id sent), then ``--duration`` seconds measured, or
fewer if ``--max-messages`` responses arrive first. During the measured phase a response is only
checked by size (an error response is a few bytes; a real one holds 8 bytes per score), so a
rejected message cannot count as scored. The process's own CPU time over the measured phase is
reported too (``client_cpu_s``): on a 2-core machine the client shares the CPU with the server.
Stdout: a ``# measuring`` line when the measured window opens, ``# measured`` when it closes, then the
JSON result.

    python -m outlierd.bench.loadgen --target 127.0.0.1:50051 --data X.npy --mode stream --records 256 \\
        --streams 4 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc
import numpy as np


from outlierd.v1 import scoring_pb2 as pb  # noqa: E402
from outlierd.server.client import request  # noqa: E402

STREAM_METHOD = "/outlierd.v1.Scorer/ScoreStream"
UNARY_METHOD = "/outlierd.v1.Scorer/Score"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MEASURING, MEASURED = "# measuring", "# measured"   # stdout lines at the start / end of the window


def build_messages(X: np.ndarray, records: int, distinct: int, raw: bool) -> list[bytes]:
    """``distinct`` serialized ScoreRequests of ``records`` rows each; message k holds rows
    ``k*records ... (k+1)*records - 1`` of ``X`` (wrapping around) and request_id k."""
    out = []
    n = X.shape[0]
    for k in range(distinct):
        rows = np.arange(k * records, (k + 1) * records) % n
        out.append(request(X[rows], request_id=k, raw=raw).SerializeToString())
    return out


def channel(target: str) -> grpc.aio.Channel:
    # a local subchannel pool: every channel gets its own connection (SO_REUSEPORT spreads
    # connections, not calls, across worker processes)
    return grpc.aio.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),
    ])


class Phase:
    """Warm-up, then the measured window [t_start, t_end); records the client's CPU time in it."""

    def __init__(self, warmup: float, duration: float):
        now = time.perf_counter()
        self.t_start = now + warmup
        self.t_end = self.t_start + duration
        self.stop = False
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None
        self.last_counted: float | None = None

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.perf_counter()
        loop.call_later(max(0.0, self.t_start - now), self._mark_start)
        loop.call_later(max(0.0, self.t_end - now), self._mark_end)

    # The markers on stdout let the parent sample the server's CPU time over the same window.
    def _mark_start(self) -> None:
        self.cpu_start = time.process_time()
        print(MEASURING, flush=True)

    def _mark_end(self) -> None:
        if not self.stop:
            self.cpu_end = time.process_time()
            self.stop = True
            print(MEASURED, flush=True)

    def cap_reached(self, when: float) -> None:
        if not self.stop:
            self.t_end = when
            self._mark_end()


class Checker:
    def __init__(self, records: int):
        self.records = records
        self.min_bytes = 8 * records  # packed doubles alone; an error response is far smaller
        self.parsed = 0
        self.failures: list[str] = []

    def full(self, data: bytes, expect_id: int | None) -> None:
        resp = pb.ScoreResponse.FromString(data)
        self.parsed += 1
        if resp.error:
            self._fail(f"error response: {resp.error}")
        elif len(resp.scores) != self.records or len(resp.anomalous) != self.records:
            self._fail(f"{len(resp.scores)} scores / {len(resp.anomalous)} flags for {self.records} records")
        elif expect_id is not None and resp.request_id != expect_id:
            self._fail(f"request_id {resp.request_id}, expected {expect_id}")

    def size(self, data: bytes) -> bool:
        if len(data) < self.min_bytes:
            self.full(data, None)
            return False
        return True

    def _fail(self, msg: str) -> None:
        if len(self.failures) < 5:
            self.failures.append(msg)
        else:
            self.failures[-1] = msg  # keep the count bounded; the last one is shown


async def run_stream(args: argparse.Namespace, msgs: list[bytes]) -> dict:
    phase, check = Phase(args.warmup, args.duration), Checker(args.records)
    counted = 0
    total = 0
    channels = [channel(args.target) for _ in range(args.streams)]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), timeout=10)

    async def one(ch: grpc.aio.Channel, sid: int) -> None:
        nonlocal counted, total
        call = ch.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)(
            timeout=args.warmup + args.duration + 30)
        window = asyncio.Semaphore(args.window)
        k = len(msgs)

        async def writer() -> None:
            i = sid  # streams start at different messages
            while True:
                await window.acquire()
                if phase.stop:
                    break
                await call.write(msgs[i % k])
                i += 1
            await call.done_writing()

        w = asyncio.get_running_loop().create_task(writer())
        expect = sid
        async for data in call:
            window.release()
            now = time.perf_counter()
            total += 1
            if now < phase.t_start:
                check.full(data, expect % k)
            elif now < phase.t_end and check.size(data):
                counted += 1
                phase.last_counted = now
                if counted >= args.max_messages:
                    phase.cap_reached(now)
            expect += 1
        await w

    phase.arm(asyncio.get_running_loop())
    await asyncio.gather(*(one(ch, s) for s, ch in enumerate(channels)))
    for ch in channels:
        await ch.close()
    seconds = phase.t_end - phase.t_start
    return {"messages": counted, "records": counted * args.records, "seconds": seconds,
            "records_per_s": counted * args.records / seconds, "messages_per_s": counted / seconds,
            "messages_total": total, "client_cpu_s": _cpu(phase), "checked": check.parsed, "failures": check.failures}


async def run_unary(args: argparse.Namespace, msgs: list[bytes]) -> dict:
    phase, check = Phase(args.warmup, args.duration), Checker(args.records)
    ch = channel(args.target)
    await asyncio.wait_for(ch.channel_ready(), timeout=10)
    call = ch.unary_unary(UNARY_METHOD, request_serializer=None, response_deserializer=None)
    lat: list[float] = []
    done = 0
    k = len(msgs)

    async def worker(wid: int) -> None:
        nonlocal done
        i = wid
        while not phase.stop:
            t0 = time.perf_counter()
            data = await call(msgs[i % k], timeout=30)
            t1 = time.perf_counter()
            if t0 < phase.t_start:
                check.full(data, i % k)
            elif t0 < phase.t_end and check.size(data):
                lat.append(t1 - t0)
                done += 1
                if done >= args.max_messages:
                    phase.cap_reached(t1)
            i += args.concurrency

    phase.arm(asyncio.get_running_loop())
    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    await ch.close()
    seconds = phase.t_end - phase.t_start
    a = np.asarray(lat) * 1e6
    pct = {f"p{q:g}_us": float(np.percentile(a, q)) if a.size else None for q in (50, 90, 99, 99.9)}
    return {"calls": int(a.size), "records": int(a.size) * args.records, "seconds": seconds,
            "calls_per_s": a.size / seconds, "records_per_s": a.size * args.records / seconds, **pct,
            "mean_us": float(a.mean()) if a.size else None, "max_us": float(a.max()) if a.size else None,
            "client_cpu_s": _cpu(phase), "checked": check.parsed, "failures": check.failures}


def _cpu(phase: Phase) -> float | None:
    if phase.cpu_start is None or phase.cpu_end is None:
        return None
    return phase.cpu_end - phase.cpu_start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="outlierd Scorer load generator (prints one JSON line)")
    p.add_argument("--target", required=True, help="host:port (127.0.0.1 only in the benchmarks)")
    p.add_argument("--data", required=True, help=".npy file of (n, n_features) float32 rows")
    p.add_argument("--mode", choices=("stream", "unary"), required=True)
    p.add_argument("--records", type=int, required=True, help="records per message")
    p.add_argument("--encoding", choices=("raw", "values"), default="raw", help="raw_values bytes or repeated float values")
    p.add_argument("--streams", type=int, default=1, help="stream mode: concurrent streams, one channel each")
    p.add_argument("--window", type=int, default=16, help="stream mode: messages in flight per stream")
    p.add_argument("--concurrency", type=int, default=1, help="unary mode: concurrent callers on one channel")
    p.add_argument("--distinct", type=int, default=16, help="distinct pre-built messages, cycled")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (responses fully checked)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured")
    p.add_argument("--max-messages", type=int, default=10_000_000, help="stop measuring after this many responses")
    args = p.parse_args(argv)
    if min(args.records, args.streams, args.window, args.concurrency, args.distinct, args.max_messages) < 1:
        p.error("--records, --streams, --window, --concurrency, --distinct and --max-messages must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    X = np.load(args.data)
    msgs = build_messages(X, args.records, args.distinct, raw=args.encoding == "raw")
    runner = run_stream if args.mode == "stream" else run_unary
    t0 = time.perf_counter()
    result = asyncio.run(runner(args, msgs))
    result.update({"mode": args.mode, "records_per_message": args.records, "encoding": args.encoding,
                   "n_features": int(X.shape[1]), "message_bytes": len(msgs[0]), "streams": args.streams,
                   "window": args.window, "concurrency": args.concurrency, "wall_s": time.perf_counter() - t0})
    print(json.dumps(result), flush=True)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
