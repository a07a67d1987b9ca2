"""``outlierd health``: ask a server's grpc.health.v1 service whether it is SERVING.

    outlierd health [--address HOST:PORT] [--service NAME] [--timeout S] [--tls-ca PEM]

Exit status 0 when the answer is SERVING, 1 otherwise (NOT_SERVING, unknown service, unreachable,
timed out), 2 for bad arguments; one line either way. Made for container health checks (the
Dockerfile's HEALTHCHECK), where Kubernetes' native gRPC probes are not available. The default
port follows ``OUTLIERD_PORT`` as ``outlierd serve`` does. Health checks need no auth token.

``python -m outlierd.health_cli`` is the same command without the rest of the CLI: it imports gRPC
only (not Numba), which keeps a health check run every few seconds cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_SERVING = 0
EXIT_UNHEALTHY = 1
EXIT_ERROR = 2


def default_address() -> str:
    """``127.0.0.1:<OUTLIERD_PORT or 50051>``."""
    return f"127.0.0.1:{os.environ.get('OUTLIERD_PORT') or 50051}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m outlierd.health_cli [options]``: parse and run; returns the exit status."""
    parser = argparse.ArgumentParser(prog="outlierd health")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(["health", *(sys.argv[1:] if argv is None else argv)]))


def add_parser(subparsers: Any) -> None:
    """Add the ``health`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "health", help="check a server's gRPC health (exit 0 when SERVING)",
        description="Call grpc.health.v1.Health/Check on a running outlierd serve. Exit status 0 when SERVING, "
                    "1 otherwise (NOT_SERVING, unknown service, unreachable, timed out).")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="server address (default 127.0.0.1:$OUTLIERD_PORT, else 127.0.0.1:50051)")
    p.add_argument("--service", default="", metavar="NAME",
                   help="service to ask about (default '': the whole server; or outlierd.v1.Scorer)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S", help="deadline in seconds (default 3)")
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="CA bundle to verify a TLS server with")
    p.set_defaults(func=run)


def check(address: str, service: str = "", timeout: float = 3.0, tls_ca: bytes | None = None) -> tuple[bool, str]:
    """Ask ``address`` about ``service``; returns (serving, status name or the reason it failed)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca))
               if tls_ca is not None else grpc.insecure_channel(address))
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()
            detail = (e.details() or "").splitlines()[0] if e.details() else ""
            if code == grpc.StatusCode.NOT_FOUND:
                return False, f"unknown service {service!r}"
            return False, f"{code.name}{': ' + detail if detail else ''}"
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return resp.status == health_pb2.HealthCheckResponse.SERVING, name
    finally:
        channel.close()


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``outlierd health``; returns the exit status."""
    address = args.address or default_address()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        print(f"outlierd: error: --address must be HOST:PORT with a port in 1-65535; got {address!r}", file=sys.stderr)
        return EXIT_ERROR
    if not args.timeout > 0:
        print(f"outlierd: error: --timeout must be > 0 seconds; got {args.timeout}", file=sys.stderr)
        return EXIT_ERROR
    ca = None
    if args.tls_ca:
        try:
            with open(args.tls_ca, "rb") as f:
                ca = f.read()
        except OSError as e:
            print(f"outlierd: error: cannot read --tls-ca {args.tls_ca}: {e.strerror}", file=sys.stderr)
            return EXIT_ERROR
    serving, what = check(address, args.service, args.timeout, ca)
    target = f"{address}{' service ' + args.service if args.service else ''}"
    if serving:
        print(f"outlierd health: {target} SERVING")
        return EXIT_SERVING
    print(f"outlierd health: {target} not serving: {what}", file=sys.stderr)
    return EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
