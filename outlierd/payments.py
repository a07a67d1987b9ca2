"""Synthetic raw payment events (card, merchant, category code, amount, place, time) for the demo,
the feature engine's tests and its benchmark. Seeded, so every run sees the same stream."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def payments(n: int, n_cards: int, *, days: float = 30.0, seed: int = 0, int_time: bool = False) -> pa.Table:
    """``n`` payments by ``n_cards`` cards over ``days`` days, sorted by time (ties possible with
    ``int_time``). Columns: event_id, card_id, merchant, mcc, amount, lat, lon, ts (epoch seconds)."""
    rng = np.random.default_rng(seed)
    card = rng.integers(0, n_cards, n)
    ts = np.sort(T0 + rng.random(n) * days * 86400.0)
    if int_time:
        ts = np.floor(ts)
    home_lat = rng.uniform(35.0, 60.0, n_cards)
    home_lon = rng.uniform(-10.0, 30.0, n_cards)
    mcc_codes = np.array(["5411", "5812", "5541", "5999", "4111", "5912", "5311", "7011", "4511", "6011",
                          "5732", "5651", "5944", "7995", "4829", "5691", "5200", "5942", "5814", "5300"])
    p = 1.0 / np.arange(1, len(mcc_codes) + 1)
    mcc = mcc_codes[rng.choice(len(mcc_codes), n, p=p / p.sum())]
    merchant = (card * 7 + rng.integers(0, 12, n)) % 5000  # each card has a handful of usual merchants
    merchant = np.where(rng.random(n) < 0.1, rng.integers(0, 5000, n), merchant)
    amount = np.round(np.exp(rng.normal(3.2, 1.0, n)), 2)
    lat = home_lat[card] + rng.normal(0.0, 0.05, n)
    lon = home_lon[card] + rng.normal(0.0, 0.05, n)
    return pa.table({
        "event_id": pa.array([f"e{i}" for i in range(n)]),
        "card_id": pa.array([f"c{c}" for c in card]),
        "merchant": pa.array([f"m{m}" for m in merchant]),
        "mcc": pa.array(mcc),
        "amount": pa.array(amount),
        "lat": pa.array(lat), "lon": pa.array(lon),
        "ts": pa.array(ts),
    })
