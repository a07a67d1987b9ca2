"""The feature engine's Numba kernel: events in order, per-entity state as arrays.

State (every array indexed by a slot; an entity's slot is found through an open-addressing table
of its 64-bit key hash):

* ``ring_t[s, K]``, ``ring_v[s, K, V]``, ``ring_h[s, K, C]``: the entity's last K events within
  the longest window (time, aggregated values, category hashes), a ring from ``head[s]`` of ``size[s]``;
* ``last_t``, ``last_lat``, ``last_lon``: the previous event; ``seen[s, C, M]``: the last M distinct
  values of each category column (``new_for_entity``);
* ``used[s]``: the tick of the last event (least-recently-seen eviction), -1 for a free slot.

Windows are evicted by event time on the entity's next event (and never read past it), so an idle
entity's sums hold only what is inside (t - w, t]. A late event (before the entity's previous
event) is processed at the previous event's time: the ring stays ordered (counted in ``LATE``).

Only ``run`` releases the GIL: the small kernels last microseconds on the server's event loop, where
releasing it would hand it to a scoring thread and then wait to get it back.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

EARTH_KM = 6371.0088
# counters in meta[]
N_ALLOC, TICK, FREE_TOP, LIVE, EVICTED, LATE, OVERFLOW = range(7)
META_SIZE = 8
EMPTY = -1


@nb.njit(cache=True, inline="always")  # inlined by Numba: a call costs reference counts on its arrays
def _mix(h: np.int64, mask: np.int64) -> np.int64:
    return (h ^ (h >> 29)) & mask


@nb.njit(cache=True, inline="always")  # inlined by Numba: a call costs reference counts on its arrays
def _lookup(tab_key, tab_slot, h):
    mask = tab_key.shape[0] - 1
    j = _mix(h, mask)
    while tab_slot[j] != EMPTY:
        if tab_key[j] == h:
            return tab_slot[j]
        j = (j + 1) & mask
    return EMPTY


@nb.njit(cache=True, inline="always")  # inlined by Numba: a call costs reference counts on its arrays
def _insert(tab_key, tab_slot, h, s):
    mask = tab_key.shape[0] - 1
    j = _mix(h, mask)
    while tab_slot[j] != EMPTY:
        j = (j + 1) & mask
    tab_key[j] = h
    tab_slot[j] = s


@nb.njit(cache=True)
def rebuild_table(tab_key, tab_slot, slot_key, used, n_alloc):
    tab_slot[:] = EMPTY
    for s in range(n_alloc):
        if used[s] >= 0:
            _insert(tab_key, tab_slot, slot_key[s], s)


@nb.njit(cache=True)
def _evict(meta, used, free, tab_key, tab_slot, slot_key):
    # the least recently seen sixteenth (at least one) go at once, then the table is rebuilt:
    # O(entities) amortised over that many new entities
    n = meta[N_ALLOC]
    k = max(1, n // 16)
    order = np.argsort(used[:n])
    for j in range(k):
        s = order[j]
        used[s] = EMPTY
        free[meta[FREE_TOP]] = s
        meta[FREE_TOP] += 1
    meta[LIVE] -= k
    meta[EVICTED] += k
    rebuild_table(tab_key, tab_slot, slot_key, used, n)


@nb.njit(cache=True, inline="always")  # inlined by Numba: a call costs reference counts on its arrays
def haversine(lat1, lon1, lat2, lon2):
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    a = math.sin(dp / 2.0) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2.0) ** 2
    return 2.0 * EARTH_KM * math.asin(min(1.0, math.sqrt(a)))


AGG_INDEX = {"sum": 0, "mean": 1, "min": 2, "max": 3, "std": 4, "relative": 5}


def hash_index(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An open-addressing table of 64-bit value hashes (already mixed: their low bits index it):
    ``(table_keys, table_positions)``, position -1 for an empty cell; :func:`find` looks one up."""
    size = 1 << max(3, (2 * max(keys.shape[0], 1) - 1).bit_length())
    table_keys = np.zeros(size, dtype=np.int64)
    table_pos = np.full(size, EMPTY, dtype=np.int64)
    _fill_index(np.ascontiguousarray(keys, dtype=np.int64), table_keys, table_pos)
    return table_keys, table_pos


@nb.njit(cache=True)
def _fill_index(keys, table_keys, table_pos):
    mask = table_keys.shape[0] - 1
    for p in range(keys.shape[0]):
        j = keys[p] & mask
        while table_pos[j] != EMPTY and table_keys[j] != keys[p]:
            j = (j + 1) & mask
        if table_pos[j] == EMPTY:
            table_keys[j] = keys[p]
            table_pos[j] = p


@nb.njit(cache=True, inline="always")  # inlined by Numba: a call costs reference counts on its arrays
def find(table_keys, table_pos, h):
    """The position of hash ``h`` in the keys :func:`hash_index` was given, or -1."""
    mask = table_keys.shape[0] - 1
    j = h & mask
    while table_pos[j] != EMPTY:
        if table_keys[j] == h:
            return table_pos[j]
        j = (j + 1) & mask
    return EMPTY


@nb.njit(cache=True)
def lookup(table_keys, table_pos, values, hashes, out):
    """``out[i]`` = ``values[position of hashes[i]]``, 0.0 for a value not in the table: a
    category's learned frequency or code per event, in one pass without temporaries."""
    for i in range(hashes.shape[0]):
        p = find(table_keys, table_pos, hashes[i])
        out[i] = values[p] if p >= 0 else 0.0


@nb.njit(cache=True)
def bucket_counts(top_keys, top_pos, known_keys, known_pos, hashes, counts):
    """Category monitoring: events per top value (``counts[position]``) and in the last bucket
    (every other value); returns how many values are not in the known table."""
    k = counts.shape[0] - 1
    unseen = 0
    for i in range(hashes.shape[0]):
        h = hashes[i]
        p = find(top_keys, top_pos, h)
        if p >= 0:
            counts[p] += 1
        else:
            counts[k] += 1
        if find(known_keys, known_pos, h) < 0:
            unseen += 1
    return unseen


@nb.njit(cache=True, nogil=True)
def run(start, keys, times, vals, hashes, lat, lon, windows, max_entities,
        meta, tab_key, tab_slot, slot_key, used, free, head, size, ring_t, ring_v, ring_h,
        last_t, last_lat, last_lon, seen, seen_n,
        count_col, agg_col, distinct_col, new_col, since_col, km_col, speed_col, out):
    """Process events ``start..n-1`` in order, writing each feature into ``out[event, column]`` where
    the plan (``*_col``: a column, or -1 when the spec does not ask for it) says; returns n, or the
    index of the first event that needs more slots than the arrays hold (the caller grows them and
    calls again from there)."""
    n = keys.shape[0]
    cap = used.shape[0]
    K = ring_t.shape[1]
    KM = K - 1  # K is a power of two: a mask instead of a modulo
    V = ring_v.shape[2]
    C = ring_h.shape[2]
    M = seen.shape[2]
    W = windows.shape[0]
    wmax = windows[W - 1] if W > 0 else 0.0
    geo = lat.shape[0] > 0
    for i in range(start, n):
        h = keys[i]
        s = _lookup(tab_key, tab_slot, h)
        if s == EMPTY:
            if meta[FREE_TOP] == 0 and meta[N_ALLOC] == cap:
                if cap < max_entities:
                    return i
                _evict(meta, used, free, tab_key, tab_slot, slot_key)
            if meta[FREE_TOP] > 0:
                meta[FREE_TOP] -= 1
                s = free[meta[FREE_TOP]]
            else:
                s = meta[N_ALLOC]
                meta[N_ALLOC] += 1
            slot_key[s] = h
            head[s] = 0
            size[s] = 0
            last_t[s] = np.nan
            last_lat[s] = np.nan
            last_lon[s] = np.nan
            for c in range(C):
                seen_n[s, c] = 0
            meta[LIVE] += 1
            _insert(tab_key, tab_slot, h, s)
        meta[TICK] += 1
        used[s] = meta[TICK]
        t = times[i]
        prev = last_t[s]
        if not math.isnan(prev) and t < prev:
            t = prev
            meta[LATE] += 1
        since = t - prev  # NaN on the first event
        if since_col >= 0:
            out[i, since_col] = since
        if geo:
            km = np.nan if math.isnan(prev) else haversine(last_lat[s], last_lon[s], lat[i], lon[i])
            if km_col >= 0:
                out[i, km_col] = km
            if speed_col >= 0:
                out[i, speed_col] = km / (since / 3600.0) if since > 0 else np.nan
            last_lat[s] = lat[i]
            last_lon[s] = lon[i]
        last_t[s] = t
        # windows: drop what is out of the longest one, append this event
        if W > 0:
            hd = head[s]
            sz = size[s]
            while sz > 0 and ring_t[s, hd] <= t - wmax:
                hd = (hd + 1) & KM
                sz -= 1
            if sz == K:
                hd = (hd + 1) & KM
                sz -= 1
                meta[OVERFLOW] += 1
            p = (hd + sz) & KM
            ring_t[s, p] = t
            for v in range(V):
                ring_v[s, p, v] = vals[i, v]
            for c in range(C):
                ring_h[s, p, c] = hashes[i, c]
            sz += 1
            head[s] = hd
            size[s] = sz
            for w in range(W):
                lo = t - windows[w]
                cnt = 0
                while cnt < sz and ring_t[s, (hd + sz - 1 - cnt) & KM] > lo:
                    cnt += 1
                first = hd + sz - cnt
                if count_col[w] >= 0:
                    out[i, count_col[w]] = cnt
                for v in range(V):
                    acc = 0.0
                    mn = np.inf
                    mx = -np.inf
                    for q in range(cnt):
                        x = ring_v[s, (first + q) & KM, v]
                        acc += x
                        if x < mn:
                            mn = x
                        if x > mx:
                            mx = x
                    mean = acc / cnt
                    # scalars, not a view of agg_col: a view costs a reference count in the loop
                    c_sum, c_mean, c_min = agg_col[w, v, 0], agg_col[w, v, 1], agg_col[w, v, 2]
                    c_max, c_std, c_rel = agg_col[w, v, 3], agg_col[w, v, 4], agg_col[w, v, 5]
                    if c_sum >= 0:
                        out[i, c_sum] = acc
                    if c_mean >= 0:
                        out[i, c_mean] = mean
                    if c_min >= 0:
                        out[i, c_min] = mn
                    if c_max >= 0:
                        out[i, c_max] = mx
                    if c_std >= 0:
                        ss = 0.0
                        for q in range(cnt):
                            d = ring_v[s, (first + q) & KM, v] - mean
                            ss += d * d
                        out[i, c_std] = math.sqrt(ss / cnt)
                    if c_rel >= 0:
                        out[i, c_rel] = vals[i, v] / mean if mean != 0 else np.nan
                for c in range(C):
                    if distinct_col[w, c] < 0:
                        continue
                    # distinct values: quadratic in the window's events, no allocation (windows are short)
                    nd = 0
                    for q in range(cnt):
                        x = ring_h[s, (first + q) & KM, c]
                        dup = False
                        for r in range(q):
                            if ring_h[s, (first + r) & KM, c] == x:
                                dup = True
                                break
                        if not dup:
                            nd += 1
                    out[i, distinct_col[w, c]] = nd
        for c in range(C):
            hv = hashes[i, c]
            k = min(seen_n[s, c], M)
            new = True
            for q in range(k):
                if seen[s, c, q] == hv:
                    new = False
                    break
            if new:
                seen[s, c, seen_n[s, c] % M] = hv
                seen_n[s, c] += 1
            if new_col[c] >= 0:
                out[i, new_col[c]] = 1.0 if new else 0.0
    return n
