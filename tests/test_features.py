"""The feature engine against the pandas oracle; spec and event errors; idle windows; state."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from outlierd.core.features import EventError, FeatureEngine, FittedCategories, SpecError, decode_events, load_spec, parse_spec
from outlierd.payments import payments

pd = pytest.importorskip("pandas")

from naive_features import oracle  # noqa: E402 - needs pandas
SPEC = "data/payments.features.json"
EXACT = ("n_10m", "n_1h", "merchant_new", "merchants_1h", "amount_max_10m", "mcc")


def _check(got: np.ndarray, want: Any, names: list[str]) -> None:
    for j, name in enumerate(names):
        w = want[name].to_numpy(dtype=float)
        if name in EXACT:
            np.testing.assert_array_equal(got[:, j], w, err_msg=name)
        else:
            np.testing.assert_allclose(got[:, j], w, rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=name)


def test_replay_matches_the_pandas_oracle():
    spec = load_spec(SPEC)
    # integer times: ties inside an entity count in input order; shuffled input: replay sorts by time
    table = payments(3000, 60, days=2, seed=3, int_time=True)
    perm = np.random.default_rng(0).permutation(table.num_rows)
    table = table.take(pa.array(perm))
    engine = FeatureEngine(spec, FittedCategories.fit(spec, decode_events(table, spec)))
    got = engine.replay(table)
    _check(got, oracle(table.to_pandas(), spec), spec.output_names)


def test_online_batches_equal_replay_bit_for_bit():
    spec = load_spec(SPEC)
    table = payments(20000, 300, days=3, seed=1)
    fitted = FittedCategories.fit(spec, decode_events(table, spec))
    offline = FeatureEngine(spec, fitted).replay(table)
    online = FeatureEngine(spec, fitted)
    parts, start = [], 0
    for size in np.random.default_rng(2).integers(1, 700, 200):
        parts.append(online.transform(table.slice(start, int(size))))
        start += int(size)
        if start >= table.num_rows:
            break
        if len(parts) == 7:  # a checkpoint restored into a new engine in the middle
            saved = online.snapshot()
            online = FeatureEngine(spec, fitted)
            assert online.restore(saved)
    parts.append(online.transform(table.slice(start)))
    got = np.vstack(parts)
    assert np.array_equal(got, offline, equal_nan=True)


def test_an_idle_entity_sees_only_its_new_event():
    spec = parse_spec({"version": 1, "entity": "card", "time": "ts", "features": [
        {"name": "n", "window": "1h", "agg": "count"}, {"name": "s", "window": "1h", "agg": "sum", "of": "amount"},
        {"name": "mx", "window": "1h", "agg": "max", "of": "amount"}]})
    engine = FeatureEngine(spec)
    first = engine.transform({"card": ["a", "a"], "ts": [0.0, 10.0], "amount": [100.0, 5.0]})
    assert first[:, 0].tolist() == [1, 2] and first[:, 1].tolist() == [100.0, 105.0]
    later = engine.transform({"card": ["a"], "ts": [10.0 + 7200.0], "amount": [7.5]})
    assert later[0].tolist() == [1.0, 7.5, 7.5]
    # the window is (t - w, t]: an event exactly w seconds old is out
    edge = engine.transform({"card": ["a"], "ts": [10.0 + 7200.0 + 3600.0], "amount": [1.0]})
    assert edge[0].tolist() == [1.0, 1.0, 1.0]


def test_late_events_are_processed_at_the_entitys_latest_time_and_counted():
    spec = parse_spec({"version": 1, "entity": "card", "time": "ts", "features": [
        {"name": "n", "window": "1h", "agg": "count"}, {"name": "gap", "since_last": True}]})
    engine = FeatureEngine(spec)
    out = engine.transform({"card": ["a", "a", "a"], "ts": [1000.0, 500.0, 1100.0]})
    assert out[:, 0].tolist() == [1, 2, 3] and out[1, 1] == 0.0 and out[2, 1] == 100.0
    assert engine.stats()["late"] == 1


def test_least_recently_seen_entities_are_evicted_and_counted():
    spec = parse_spec({"version": 1, "entity": "card", "time": "ts", "state": {"max_entities": 32},
                       "features": [{"name": "n", "window": "1d", "agg": "count"}]})
    engine = FeatureEngine(spec)
    cards = [f"c{i}" for i in range(40)]
    engine.transform({"card": cards, "ts": np.arange(40.0)})
    stats = engine.stats()
    assert stats["entities"] <= 32 and stats["evicted"] >= 8 and stats["capacity"] == 32
    # the most recent entity is still there; the first one was evicted and starts again
    out = engine.transform({"card": ["c39", "c0"], "ts": [50.0, 51.0]})
    assert out[:, 0].tolist() == [2.0, 1.0]


def test_composite_keys_iso_times_and_timestamps():
    spec = parse_spec({"version": 1, "entity": ["bank", "card"], "time": "ts", "features": [
        {"name": "n", "window": "1h", "agg": "count"}, {"name": "dow", "day_of_week": True}]})
    iso = FeatureEngine(spec).transform({"bank": ["x", "y", "x"], "card": [1, 1, 1],
                                         "ts": ["2024-05-06T10:00:00Z", "2024-05-06T10:00:00+00:00", "2024-05-06T10:30:00"]})
    assert iso[:, 0].tolist() == [1, 1, 2]
    # 2024-05-06 was a Monday: day 0 -> sin 0, cos 1
    np.testing.assert_allclose(iso[0, 1:], [0.0, 1.0], atol=1e-12)
    ts = pa.array(np.array(["2024-05-06T10:00:00", "2024-05-06T10:30:00", "2024-05-06T12:00:00"], dtype="datetime64[ns]"))
    stamped = FeatureEngine(spec).transform(pa.table({"bank": ["x"] * 3, "card": ["1"] * 3, "ts": ts}))
    assert stamped[:, 0].tolist() == [1, 2, 1]


@pytest.mark.parametrize("events, message", [
    ({"card_id": ["a", None], "ts": [1.0, 2.0], "amount": [1.0, 2.0]}, "column 'card_id' row 1: missing entity key"),
    ({"card_id": ["a", "b"], "ts": ["2024-01-01T00:00:00Z", "yesterday"], "amount": [1.0, 2.0]},
     "column 'ts' row 1: cannot parse event time 'yesterday'"),
    ({"card_id": ["a", "b"], "ts": [1.0, 2.0], "amount": ["1.5", "ten"]}, "column 'amount' row 1: 'ten' is not a number"),
    ({"card_id": ["a", "b"], "ts": [1.0, 2.0], "amount": [1.0, None]}, "column 'amount' row 1: missing value"),
    ({"card_id": ["a"], "ts": [1.0]}, "column 'amount' is missing"),
])
def test_bad_events_name_the_column_and_the_row(events, message):
    spec = parse_spec({"version": 1, "entity": "card_id", "time": "ts",
                       "features": [{"name": "s", "window": "1h", "agg": "sum", "of": "amount"}]})
    engine = FeatureEngine(spec)
    with pytest.raises(EventError, match=message.replace("(", r"\(")):
        engine.transform(events)
    assert engine.stats()["entities"] == 0  # a refused batch leaves the state as it was
    assert engine.transform({"card_id": ["a"], "ts": [1.0], "amount": [2.0]})[0, 0] == 2.0


@pytest.mark.parametrize("spec, message", [
    ({"version": 2}, "'version' must be 1"),
    ({"version": 1, "entity": "c", "time": "t", "features": [{"name": "x", "window": "1 week", "agg": "sum", "of": "a"}]},
     r"features\[0\] \('x'\): window must be like"),
    ({"version": 1, "entity": "c", "time": "t", "features": [{"name": "x", "window": "1h", "agg": "median", "of": "a"}]},
     "agg must be one of"),
    ({"version": 1, "entity": "c", "time": "t", "features": [{"name": "x", "window": "1h", "agg": "sum"}]}, "'of' must name a column"),
    ({"version": 1, "entity": "c", "time": "t", "features": [{"name": "h", "time_of_day": True}, {"name": "h_sin", "since_last": True}]},
     "repeated"),
    ({"version": 1, "entity": "c", "time": "t", "features": [{"name": "x", "numeric": "a", "transfrom": "log1p"}]}, "unknown key"),
])
def test_spec_errors_are_clear(spec, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)


def test_spec_file_example_from_the_issue_parses(tmp_path):
    example = {"version": 1, "entity": "card_id", "time": "ts", "features": [
        {"name": "amount", "numeric": "amount", "transform": "log1p"}, {"name": "mcc", "category": "mcc", "encode": "frequency"},
        {"name": "merchant_new", "new_for_entity": "merchant"}, {"name": "hour", "time_of_day": True},
        {"name": "n_1h", "window": "1h", "agg": "count"}, {"name": "amount_sum_1h", "window": "1h", "agg": "sum", "of": "amount"},
        {"name": "amount_mean_24h", "window": "24h", "agg": "mean", "of": "amount"},
        {"name": "amount_max_10m", "window": "10m", "agg": "max", "of": "amount"}, {"name": "since_last", "since_last": True},
        {"name": "km_from_last", "distance_from_last": ["lat", "lon"]}, {"name": "kmh_from_last", "speed_from_last": ["lat", "lon"]}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(example))
    spec = load_spec(path)
    assert spec.output_names[:5] == ["amount", "mcc", "merchant_new", "hour_sin", "hour_cos"]
    assert spec.windows == [600.0, 3600.0, 86400.0]


def _ipc(table: pa.Table, batches: int = 1) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        if batches == 1:
            writer.write_table(table)
        else:
            for part in table.to_batches(max_chunksize=max(1, -(-table.num_rows // batches))):
                writer.write_batch(part)
    return sink.getvalue().to_pybytes()


def _same_batch(got: Any, want: Any) -> None:
    assert got.n == want.n and np.array_equal(got.entity, want.entity) and np.array_equal(got.time, want.time, equal_nan=True)
    assert set(got.numeric) == set(want.numeric) and set(got.categories) == set(want.categories)
    for c in want.numeric:
        assert np.array_equal(got.numeric[c], want.numeric[c], equal_nan=True), c
    for c in want.categories:
        assert np.array_equal(got.categories[c].hashes(), want.categories[c].hashes()), c
    assert (got.geo is None) == (want.geo is None)
    if want.geo is not None:
        assert np.array_equal(got.geo[0], want.geo[0]) and np.array_equal(got.geo[1], want.geo[1])


def test_served_messages_read_in_place_give_decode_events_batch():
    from outlierd.core.features.events import MessageDecoder, RawMessage

    spec = load_spec(SPEC)
    table = payments(6000, 80, seed=5)
    # unused columns of other flat types travel along (their buffers are counted, not read)
    table = table.append_column("n", pa.array(np.arange(table.num_rows), pa.int64())).append_column(
        "flag", pa.array(np.arange(table.num_rows) % 3 == 0)).append_column(
        "at", pa.array(np.arange(table.num_rows).astype("datetime64[s]")))
    decoder = MessageDecoder(spec)
    located = 0
    for start, size in [(0, 256), (256, 1), (300, 0), (400, 511), (1000, 256), (2000, 3000)]:
        part = table.slice(start, size)  # a slice: offsets that do not start at 0 before writing
        for _ in range(2):
            events = decoder.read(_ipc(part))
            located += isinstance(events, RawMessage)
            assert events.num_rows == size
            _same_batch(decoder.decode(events), decode_events(part, spec))
    assert located >= 9  # every message after the first with rows: located, not read by Arrow
    # another schema (columns reordered, a key as large_string): learnt, located, decoded by decode_events
    other = table.select(["ts", "lon", "lat", "amount", "mcc", "merchant", "card_id"]).slice(0, 300)
    other = other.set_column(6, "card_id", other.column("card_id").cast(pa.large_string()))
    for _ in range(2):
        events = decoder.read(_ipc(other))
        _same_batch(decoder.decode(events), decode_events(other, spec))
    assert isinstance(events, RawMessage)
    # several batches in one message: Arrow's reader, the same batch
    events = decoder.read(_ipc(table.slice(0, 700), batches=3))
    assert not isinstance(events, RawMessage)
    _same_batch(decoder.decode(events), decode_events(table.slice(0, 700), spec))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.set_column(t.schema.get_field_index("ts"), "ts", pa.array([1.0, np.nan, 3.0])),
     "column 'ts' row 1: event time must be finite"),
    (lambda t: t.set_column(t.schema.get_field_index("lat"), "lat", pa.array([1.0, 2.0, 91.0])), "column 'lat' row 2: 91.0 is outside"),
    (lambda t: t.set_column(t.schema.get_field_index("card_id"), "card_id", pa.array(["a", None, "c"])),
     "column 'card_id' row 1: missing entity key"),
    (lambda t: t.set_column(t.schema.get_field_index("amount"), "amount", pa.array([1.0, 2.0, None])), "column 'amount' row 2: missing value"),
    (lambda t: t.set_column(t.schema.get_field_index("amount"), "amount", pa.array(["1", "x", "2"])), "column 'amount' row 1: 'x' is not a number"),
    (lambda t: t.drop_columns(["mcc"]), "column 'mcc' is missing"),
])
def test_served_messages_with_bad_events_get_decode_events_errors(change, message):
    from outlierd.core.features.events import MessageDecoder

    spec = load_spec(SPEC)
    good = payments(3, 2, seed=1)
    decoder = MessageDecoder(spec)
    decoder.decode(decoder.read(_ipc(good)))  # the schema learnt: a bad message of the same schema is located first
    bad = change(good)
    with pytest.raises(EventError, match=message.replace("(", r"\(")):
        decoder.decode(decoder.read(_ipc(bad)))
    _same_batch(decoder.decode(decoder.read(_ipc(good))), decode_events(good, spec))


def test_served_message_with_text_offsets_outside_its_data_is_refused_not_read():
    from outlierd.core.features.events import MessageDecoder, RawMessage

    spec = load_spec(SPEC)
    good = payments(64, 4, seed=2)
    decoder = MessageDecoder(spec)
    decoder.read(_ipc(good))
    data = bytearray(_ipc(good))
    events = decoder.read(bytes(data))
    assert isinstance(events, RawMessage)
    card = good.schema.get_field_index("card_id")
    offsets_at, _ = events.buffers[sum(3 if pa.types.is_string(f.type) else 2 for f in list(good.schema)[:card]) + 1]
    data[offsets_at + 4 * 64: offsets_at + 4 * 65] = (1 << 30).to_bytes(4, "little")  # the last offset: far past the data
    with pytest.raises((EventError, pa.ArrowException)):
        decoder.decode(decoder.read(bytes(data)))
