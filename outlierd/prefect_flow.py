"""Optional: the retraining trigger as a Prefect flow, for teams that already run Prefect.

``pip install 'outlierd[prefect]'``, then deploy :func:`retrain_flow` like any flow (e.g.
``retrain_flow.serve(cron="30 3 * * *", parameters={...})``). It wraps the same function as
``outlierd retrain-policy --now`` (:meth:`monitoring.trigger.RetrainPolicy.trigger_now`, with the
champion's training options): a challenger is published and the trigger audited; promotion stays a
gated step. Prefect is imported when the flow is first asked for (``import outlierd`` never
imports it); without it, a clear error says what to install.
"""

from __future__ import annotations

from typing import Any

from outlierd.core.errors import UnsupportedError


def retrain(registry: str, model: str, data: str, **options: Any) -> dict[str, Any]:
    """Retrain ``model`` on ``data`` (a file, or a directory: its newest data file) and publish it as
    ``challenger``; the champion's training options unless given. Returns the trigger as a dict."""
    from outlierd.cli import champion_training_options
    from outlierd.monitoring.trigger import RetrainPolicy
    from outlierd.training.train import train

    kwargs = {"alert_rate": 0.01, **champion_training_options(registry, model), **options}
    t = RetrainPolicy(registry, model, data, train=train, train_kwargs=kwargs).trigger_now()
    return {"model": model, "version": t.version, "kind": t.kind, "reason": t.reason, "data": t.data, "seconds": t.seconds}


def __getattr__(name: str) -> Any:
    # ``retrain_flow`` is built on first access, so importing this module does not import Prefect
    if name == "retrain_flow":
        try:
            from prefect import flow
        except ImportError as e:
            raise UnsupportedError("the Prefect flow needs Prefect: pip install 'outlierd[prefect]'") from e
        f = flow(name="outlierd-retrain", log_prints=True)(retrain)
        globals()["retrain_flow"] = f
        return f
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
