"""``outlierd registry``: list, show and alias model versions in a directory registry.

Public forms (used by tools outside the project; keep them stable)::

    outlierd registry list  --registry DIR --model NAME [--json]
    outlierd registry show  --registry DIR --model NAME (VERSION|ALIAS) [--json]
    outlierd registry alias --registry DIR --model NAME ALIAS VERSION

Errors are one ``outlierd: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core.errors import OutlierdError
from core.registry import Registry

EXIT_ERROR = 2


def add_parser(subparsers: Any) -> None:
    """Add the ``registry`` subcommand (``list``, ``show``, ``alias``) to an argparse subparsers object."""
    reg = subparsers.add_parser(
        "registry",
        help="list, show and alias model versions in a registry",
        description="Inspect a directory registry and move its aliases.",
    )
    reg.set_defaults(func=run)
    sub = reg.add_subparsers(dest="registry_command", metavar="{list,show,alias}", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--registry", required=True, metavar="DIR", help="registry root directory")
        p.add_argument("--model", required=True, metavar="NAME", help="model name")

    p_list = sub.add_parser("list", help="list a model's versions, oldest first")
    common(p_list)
    p_list.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    p_show = sub.add_parser("show", help="show one version (by number or alias)")
    common(p_show)
    p_show.add_argument("ref", metavar="VERSION|ALIAS", help="version number or alias name")
    p_show.add_argument("--json", action="store_true", help="print JSON (including the full manifest)")

    p_alias = sub.add_parser("alias", help="point an alias (e.g. champion) at a version")
    common(p_alias)
    p_alias.add_argument("alias", metavar="ALIAS", help="alias name, e.g. champion or challenger")
    p_alias.add_argument("version", metavar="VERSION", help="version number (or an existing alias)")


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``outlierd registry ...`` command; returns the exit code."""
    registry = Registry(args.registry)
    try:
        if args.registry_command == "list":
            return _list(registry, args)
        if args.registry_command == "show":
            return _show(registry, args)
        if args.registry_command == "alias":
            return _alias(registry, args)
        raise ValueError(f"unknown registry command {args.registry_command!r}")
    except (OutlierdError, ValueError, OSError) as e:
        print(f"outlierd: error: {_message(e)}", file=sys.stderr)
        return EXIT_ERROR


def _message(e: BaseException) -> str:
    # LookupError subclasses (ModelNotFoundError) would otherwise be shown through repr().
    return str(e.args[0]) if len(e.args) == 1 else str(e)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in sorted(metrics.items()):
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts) or "-"


def _list(registry: Registry, args: argparse.Namespace) -> int:
    versions = registry.versions(args.model)
    if args.json:
        _print_json(versions)
        return 0
    rows = [
        (
            str(v["version"]),
            ",".join(v["aliases"]) or "-",
            v["created"] or "-",
            v["detector"] or ("(corrupt)" if v.get("error") else "-"),
            _fmt_metrics(v["metrics"]),
        )
        for v in versions
    ]
    header = ("VERSION", "ALIASES", "CREATED", "DETECTOR", "METRICS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    return 0


def _show(registry: Registry, args: argparse.Namespace) -> int:
    info = registry.get(args.model, args.ref)
    if args.json:
        _print_json(info)
        return 0
    m = info["manifest"]
    features = [f.get("name") for f in m.get("features", [])]
    lines = [
        f"model:      {info['model']}",
        f"version:    {info['version']}",
        f"aliases:    {', '.join(info['aliases']) or '-'}",
        f"created:    {info['created'] or '-'}",
        f"detector:   {info['detector']} {json.dumps((m.get('detector') or {}).get('params', {}), sort_keys=True)}",
        f"threshold:  {info['threshold']}",
        f"features:   {len(features)} ({', '.join(map(str, features[:8]))}{', …' if len(features) > 8 else ''})",
        f"metrics:    {_fmt_metrics(info['metrics'])}",
        f"lineage:    {json.dumps(m.get('lineage') or {}, sort_keys=True)}",
        f"path:       {info['path']}",
    ]
    print("\n".join(lines))
    return 0


def _alias(registry: Registry, args: argparse.Namespace) -> int:
    try:
        previous: int | None = registry.aliases(args.model).get(args.alias)
    except ValueError:
        previous = None  # an invalid alias name is reported by set_alias below
    version = registry.set_alias(args.model, args.alias, args.version)
    was = f" (was {previous})" if previous is not None and previous != version else ""
    print(f"{args.model}: {args.alias} -> {version}{was}")
    return 0
