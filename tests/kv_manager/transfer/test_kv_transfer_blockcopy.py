"""The block copier: run coalescing and byte-exact copies on every CPU path."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kv_manager.transfer.blockcopy import BlockCopier, check_ids, coalesce
from trident.core.errors import KVTransferError

torch.set_num_threads(1)


def test_coalesce_merges_runs_that_advance_together():
    long_s, long_d = [*range(100, 150), 7, *range(200, 230)], [*range(50), 99, *range(60, 90)]
    assert coalesce(long_s, long_d) == [(100, 0, 50), (7, 99, 1), (200, 60, 30)]  # numpy path
    assert coalesce([], []) == []
    assert coalesce([4, 5, 6, 9], [0, 1, 2, 3]) == [(4, 0, 3), (9, 3, 1)]
    assert coalesce([1, 2, 3], [5, 4, 3]) == [(1, 5, 1), (2, 4, 1), (3, 3, 1)]
    assert coalesce([0, 1, 7, 8], [2, 3, 4, 5]) == [(0, 2, 2), (7, 4, 2)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pattern", ["scattered", "runs", "one_long_run"])
def test_copy_is_byte_exact(threads, pattern):
    # 64 KiB blocks so that the threaded path (>= 2 MiB) and run chunking (4 MiB) both run.
    src = torch.randint(-1000, 1000, (128, 2, 16, 1024), dtype=torch.int16)
    dst = torch.zeros((96, 2, 16, 1024), dtype=torch.int16)
    rng = random.Random(7)
    if pattern == "scattered":
        s, d = rng.sample(range(128), 60), rng.sample(range(96), 60)
    elif pattern == "runs":
        s, d = [*range(10, 30), *range(50, 90)], [*range(0, 20), *range(30, 70)]
    else:
        s, d = list(range(128))[:96], list(range(96))
    copier = BlockCopier(threads)
    try:
        copier.copy(src, dst, s, d)
    finally:
        copier.close()
    assert torch.equal(dst[d], src[s])
    untouched = sorted(set(range(96)) - set(d))
    assert not dst[untouched].any()


def test_check_ids_names_the_field_and_the_bad_id():
    assert check_ids("ids", (3, 0, 2), 4) == [3, 0, 2]
    assert check_ids("ids", [np.int64(1)], 4) == [1] and check_ids("ids", [], 4) == []
    for bad, match in (
        ([0, 4], r"ids: 4 is not a block id in \[0, 4\)"),
        ([-2, 1], "ids: -2"),
        ([0.5], "expected block ids"),
        ([True], "expected block ids"),
    ):
        with pytest.raises(KVTransferError, match=match):
            check_ids("ids", bad, 4)
