"""OwnerTable (the C owner map of the KV index) against a dict: the same answers for every
operation the index uses, through growth and heavy deletion, and the same walk."""

from __future__ import annotations

import random

import pytest

from router_ensemble.routing.index import _walk_dict

owners = pytest.importorskip(
    "router_ensemble.routing._owners", reason="C extension not built (setup.py)"
)


def test_behaves_like_a_dict_through_growth_and_deletion() -> None:
    rng = random.Random(1)
    table, model = owners.OwnerTable(), {}
    # small sequential keys cluster in linear probing; random 64-bit ones are the real load
    keys = list(range(3000)) + [rng.getrandbits(64) for _ in range(3000)] + [0, 2**64 - 1]
    for step in range(40_000):
        key = rng.choice(keys)
        op = rng.random()
        if op < 0.5:
            value = rng.randrange(1, 2**64)
            table[key] = value
            model[key] = value
        elif op < 0.8:
            assert table.pop(key, None) == model.pop(key, None)
        else:
            assert table.get(key, 0) == model.get(key, 0)
        if step % 5000 == 0:
            assert len(table) == len(model)
            assert sorted(table.items()) == sorted(model.items())
    assert len(table) == len(model)
    assert sorted(table.items()) == sorted(model.items())
    assert all(table.get(k) == model.get(k) for k in keys)


def test_dict_api_details() -> None:
    table = owners.OwnerTable()
    table[5] = 3
    assert table[5] == 3 and table.get(5) == 3 and table.get(6) is None and len(table) == 1
    assert table.get(-1, 0) == 0 and table.get("x", 0) == 0 and table.get(2**70, 0) == 0
    with pytest.raises(KeyError):
        table[6]
    with pytest.raises(KeyError):
        table.pop(6)
    del table[5]
    assert len(table) == 0
    with pytest.raises(OverflowError):
        table[-1] = 1
    with pytest.raises(OverflowError):
        table[2**64] = 1
    with pytest.raises(OverflowError):
        table[1] = 2**64
    with pytest.raises(TypeError):
        table["x"] = 1
    with pytest.raises(ValueError):
        table[1] = 0
    with pytest.raises(TypeError):
        owners.OwnerTable(1)


def test_walk_equals_the_dict_walk() -> None:
    rng = random.Random(2)
    chain = [rng.getrandbits(64) for _ in range(600)]  # longer than the walk's stack buffer
    table, model = owners.OwnerTable(), {}
    for depth, key in enumerate(chain):
        # worker i holds the first 40 * (i + 1) blocks, with holes for worker 0
        mask = sum(1 << i for i in range(15) if depth < 40 * (i + 1) and (i or depth % 97))
        if mask:
            table[key] = model[key] = mask
    for _ in range(300):
        n = rng.randrange(0, len(chain) + 1)
        hashes = chain[:n] + ([rng.getrandbits(64)] if rng.random() < 0.3 else [])
        mask = rng.choice([-1, rng.randrange(1, 2**15), 1, 2**14])
        expected = _walk_dict(model, hashes, mask) if hashes else []
        got = table.walk(hashes, mask) if hashes else []
        expected = [(d, b & (2**64 - 1)) for d, b in expected]  # -1: every worker
        assert got == expected, (n, mask)
    assert table.walk(tuple(chain[:3]) + (-5, "x"), 2) == [(3, 2)]  # unstorable keys: absent
