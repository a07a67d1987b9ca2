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


FRAUD_KINDS = ("impossible_travel", "card_testing", "night_spree", "cash_out")


def with_frauds(n: int, n_cards: int, *, incidents: int, days: float = 30.0, seed: int = 0) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """``payments(n, n_cards)`` plus ``incidents`` injected frauds of the four kinds (round robin), all
    sorted by time. Returns the table, each event's fraud kind ("" for a normal one) and incident
    number (-1 for a normal one). The kinds: impossible travel (a payment thousands of km from the
    card's previous one, minutes later), card testing (a burst of tiny amounts at new merchants),
    night sprees (large purchases between 01:00 and 04:00 UTC), cash-outs (repeated large ATM withdrawals)."""
    base = payments(n, n_cards, days=days, seed=seed)
    rng = np.random.default_rng(seed + 1)
    cols = {c: base.column(c).to_numpy(zero_copy_only=False) for c in ("card_id", "merchant", "mcc", "amount", "lat", "lon", "ts")}
    ts = cols["ts"]
    add: dict[str, list] = {c: [] for c in cols}
    kinds: list[str] = []
    incident: list[int] = []
    span = (ts.min() + 86400.0, ts.max() - 86400.0)
    for k in range(incidents):
        kind = FRAUD_KINDS[k % 4]
        i = int(rng.integers(0, n))
        while not span[0] < ts[i] < span[1]:
            i = int(rng.integers(0, n))
        card, t0, lat0, lon0 = cols["card_id"][i], ts[i], cols["lat"][i], cols["lon"][i]
        if kind == "impossible_travel":
            rows = [(t0 + rng.uniform(120, 900), f"m{rng.integers(5000, 6000)}", "5732", float(np.round(np.exp(rng.normal(5.5, 0.5)), 2)),
                     lat0 - 40.0 + rng.normal(0, 1), lon0 + 100.0 + rng.normal(0, 1))]
        elif kind == "card_testing":
            m = int(rng.integers(8, 15))
            rows = [(t0 + 30.0 + 20.0 * j + rng.uniform(0, 10), f"m{rng.integers(6000, 9000)}", "5999",
                     float(np.round(rng.uniform(0.5, 2.0), 2)), lat0, lon0) for j in range(m)]
        elif kind == "night_spree":
            night = np.floor(t0 / 86400.0) * 86400.0 + 86400.0 + rng.uniform(3600, 3 * 3600)
            rows = [(night + 300.0 * j, f"m{rng.integers(0, 5000)}", str(rng.choice(["5944", "5732", "5651"])),
                     float(np.round(np.exp(rng.normal(6.0, 0.4)), 2)), lat0, lon0) for j in range(int(rng.integers(5, 8)))]
        else:  # cash_out
            rows = [(t0 + 60.0 + 400.0 * j, f"m{rng.integers(9000, 9100)}", "6011", float(np.round(rng.uniform(800, 2000), -1)),
                     lat0, lon0) for j in range(int(rng.integers(3, 6)))]
        for t, merchant, mcc, amount, lat, lon in rows:
            for c, v in zip(("card_id", "merchant", "mcc", "amount", "lat", "lon", "ts"), (card, merchant, mcc, amount, lat, lon, t)):
                add[c].append(v)
            kinds.append(kind)
            incident.append(k)
    merged = {c: np.concatenate([np.asarray(cols[c], dtype=object if cols[c].dtype.kind in "OUS" else None),
                                 np.asarray(add[c], dtype=object if cols[c].dtype.kind in "OUS" else np.float64)]) for c in cols}
    kind_all = np.concatenate([np.full(n, "", dtype=object), np.asarray(kinds, dtype=object)])
    incident_all = np.concatenate([np.full(n, -1), np.asarray(incident, dtype=np.int64)])
    order = np.argsort(merged["ts"].astype(np.float64), kind="stable")
    table = pa.table({
        "event_id": pa.array([f"e{i}" for i in range(len(order))]),
        **{c: pa.array(merged[c][order].tolist() if merged[c].dtype == object else merged[c][order]) for c in cols}})
    return table, kind_all[order], incident_all[order]
