"""``outlierd consume``: score a Kafka topic or MQTT topics through the data plane, publish results.

    outlierd consume --registry DIR --model NAME [--alias champion] \\
        --source kafka://HOST:PORT/TOPIC --group GROUP --out kafka://HOST:PORT/SCORES \\
        [--alerts kafka://HOST:PORT/ALERTS] [--dlq kafka://HOST:PORT/DLQ] \\
        [--guarantee at-least-once|exactly-once] [--format json|arrow] [--max-inflight N] [--metrics-port P]
    outlierd consume ... --source mqtt://HOST:PORT/devices/+/telemetry --out mqtt://HOST:PORT/scores \\
        [--alerts mqtt://HOST:PORT/alerts] [--qos 1]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any


def add_parser(sub: Any) -> None:
    from outlierd.core.registry import CHAMPION

    p = sub.add_parser("consume", help="score a Kafka topic or MQTT topics; publish scores, alerts and dead letters",
                       description="A long-running consumer: reads records from a broker, scores them through the same "
                                   "data plane as `outlierd serve` (hot reload, thresholds in force), publishes one "
                                   "result per record, an alert with top-k explanations per flagged record, and the "
                                   "messages it cannot score to the dead-letter topic. Input is acknowledged only after "
                                   "its outputs are delivered.")
    p.add_argument("--registry", required=True, metavar="DIR", help="registry root directory")
    p.add_argument("--model", required=True, metavar="NAME", help="registry model name")
    p.add_argument("--alias", default=CHAMPION, metavar="ALIAS", help=f"alias to serve, watched for changes (default {CHAMPION})")
    p.add_argument("--source", required=True, metavar="URL",
                   help="kafka://HOST:PORT/TOPIC or mqtt://HOST:PORT/TOPIC-FILTER (e.g. devices/+/telemetry)")
    p.add_argument("--out", required=True, metavar="URL", help="where results go: kafka://HOST:PORT/TOPIC or mqtt://HOST:PORT/TOPIC")
    p.add_argument("--alerts", metavar="URL", help="where alerts go (MQTT: a topic per device below it)")
    p.add_argument("--dlq", metavar="URL", help="dead-letter topic for messages that cannot be scored (error in headers)")
    p.add_argument("--group", metavar="GROUP", help="Kafka consumer group (required for kafka://); MQTT: client id")
    p.add_argument("--guarantee", default="at-least-once", choices=("at-least-once", "exactly-once"),
                   help="Kafka delivery: at-least-once (default) or exactly-once (transactions; read with read_committed)")
    p.add_argument("--instance", default="", metavar="ID",
                   help="exactly-once: this replica's stable name (its transactional id; default: the host name, "
                        "a StatefulSet pod's name); a restarted replica with the same name fences its old transactions")
    p.add_argument("--format", default="json", choices=("json", "arrow"), help="message format (default json)")
    p.add_argument("--max-inflight", type=int, default=2000, metavar="N",
                   help="records between poll and commit at most (one batch; default 2000)")
    p.add_argument("--qos", type=int, default=1, choices=(0, 1, 2), help="MQTT QoS (default 1)")
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT", help="Prometheus /metrics port (default 0: none)")
    p.add_argument("--health-port", type=int, default=0, metavar="PORT", help="grpc.health.v1 port for probes (default 0: none)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="scoring threads (default 2)")
    p.add_argument("--no-alerts-explain", dest="explain", action="store_false",
                   help="no alerts (and no explanation pass) even with --alerts")
    # capture as `serve` writes it (flags and help from ServeSettings): replicas and consumers fill one store
    from dataclasses import fields

    from outlierd.cli import serve_argument
    from outlierd.server.settings import ServeSettings, field_docs

    docs = field_docs()
    for f in fields(ServeSettings):
        if f.name in CAPTURE_FIELDS:
            flag, kwargs = serve_argument(f, docs[f.name])
            p.add_argument(flag, **kwargs)
    p.set_defaults(func=run)


CAPTURE_FIELDS = ("capture", "capture_sample", "capture_max_age_s", "capture_max_bytes", "feedback_store", "rollout")


def capture_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The capture flags given, else their OUTLIERD_<FIELD> variables (as for serve: the configmap and
    the PostgreSQL Secret reach consumers too), typed like ServeSettings.from_env types them."""
    from dataclasses import fields

    from outlierd.server.settings import ServeSettings

    given: dict[str, Any] = {}
    for f in fields(ServeSettings):
        if f.name not in CAPTURE_FIELDS:
            continue
        value: Any = getattr(args, f.name, None)
        if value is None:
            value = os.environ.get(f"OUTLIERD_{f.name.upper()}")
        if value is None:
            continue
        if isinstance(value, str):
            t = str(f.type)
            try:
                if t.startswith("int"):
                    value = int(value)
                elif t.startswith("float"):
                    value = float(value)
            except ValueError:
                raise ValueError(f"OUTLIERD_{f.name.upper()} must be a number; got {value!r}") from None
            if "Path" in t and not value.startswith(("postgresql://", "postgres://")):  # a URL stays a URL
                from pathlib import Path

                value = Path(value)
        given[f.name] = value
    return given


def run(args: argparse.Namespace) -> int:
    from outlierd.core.errors import InvalidInputError
    from outlierd.monitoring.metrics import ServiceMetrics, start_metrics_server
    from outlierd.server.consume import ConsumeMetrics
    from outlierd.server.consume_app import run_consumer
    from outlierd.server.settings import ServeSettings

    logging.basicConfig(level=os.environ.get("OUTLIERD_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    scheme = args.source.split("://", 1)[0]
    if scheme not in ("kafka", "mqtt"):
        raise InvalidInputError(f"--source must be kafka://HOST:PORT/TOPIC or mqtt://HOST:PORT/TOPIC; got {args.source!r}")
    from pathlib import Path

    try:
        given = capture_settings(args)
    except ValueError as e:
        raise InvalidInputError(str(e)) from None
    settings = ServeSettings(registry=Path(args.registry), model=args.model, alias=args.alias, threads=args.threads,
                             metrics_port=args.metrics_port, **given)
    settings.validate()
    alerts = bool(args.alerts) and args.explain
    if scheme == "kafka":
        from outlierd.server.kafka_consumer import KafkaConsumerLoop, KafkaOptions, parse_url

        for url in (args.source, args.out, args.alerts, args.dlq):  # before the model loads
            if url:
                parse_url(url)

        if not args.group:
            raise InvalidInputError("--group is required for a kafka:// source (the consumer group that shares its partitions)")
        opts = KafkaOptions(args.source, args.group, args.out, args.alerts, args.dlq, args.guarantee, args.max_inflight,
                            instance=args.instance)
    else:
        from outlierd.server.mqtt_consumer import MqttConsumerLoop, MqttOptions, parse_url as parse_mqtt

        for url in (args.source, args.out, args.alerts, args.dlq):
            if url:
                parse_mqtt(url)

        mopts = MqttOptions(args.source, args.out, args.alerts, args.dlq, client_id=args.group or f"outlierd-{args.model}",
                            qos=args.qos, max_inflight=args.max_inflight)
    cmetrics = ConsumeMetrics()
    metrics = ServiceMetrics()
    if args.metrics_port:
        start_metrics_server(args.metrics_port, "0.0.0.0")

    def make_loop(core: Any) -> Any:
        if scheme == "kafka":
            return KafkaConsumerLoop(core, opts, cmetrics)
        return MqttConsumerLoop(core, mopts, cmetrics)

    asyncio.run(run_consumer(settings, make_loop, fmt=args.format, alerts=alerts, health_port=args.health_port,
                             metrics=metrics, consume_metrics=cmetrics))
    return 0
