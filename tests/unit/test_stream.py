"""Streaming input: rank/worker split, seeded shuffle, and exact mid-epoch resume."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from pipeline.dataset.manifest import DatasetError, load_manifest
from pipeline.loader.stream import DataConfig, TokenBatchLoader


def _cfg(ds, **kw) -> DataConfig:
    return DataConfig(
        path=str(ds), **{"batch_size": 4, "num_workers": 2, "shuffle_buffer": 16, "seed": 3, **kw}
    )


def _take(loader, n):
    return [b["index"].clone() for b in itertools.islice(iter(loader), n)]


def test_two_ranks_two_workers_see_every_sample_once_with_equal_batches(tiny_dataset):
    split = load_manifest(tiny_dataset).splits["train"]
    per_rank = []
    for rank in range(2):
        loader = TokenBatchLoader(_cfg(tiny_dataset, batch_size=1), rank=rank, world_size=2, loop=False)
        per_rank.append(torch.cat(_take(loader, 10**6)).tolist())
        assert len(per_rank[-1]) == loader.batches_per_epoch
    assert len(per_rank[0]) == len(per_rank[1]) == split.sequences // 2
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)) == split.sequences  # exactly once across ranks x workers


def test_tokens_match_their_index_and_shuffle_depends_on_seed_and_epoch(tiny_dataset):
    a = TokenBatchLoader(_cfg(tiny_dataset, num_workers=0))
    n = a.batches_per_epoch
    first, second = _take(a, 2 * n)[:n], _take(TokenBatchLoader(_cfg(tiny_dataset, num_workers=0)), 2 * n)[n:]
    assert torch.equal(
        torch.cat(first), torch.cat(_take(TokenBatchLoader(_cfg(tiny_dataset, num_workers=0)), n))
    )
    assert not torch.equal(torch.cat(first), torch.cat(second))  # epoch 1 is a new order
    assert sorted(torch.cat(first).tolist()) == sorted(torch.cat(second).tolist())
    other_seed = _take(TokenBatchLoader(_cfg(tiny_dataset, num_workers=0, seed=4)), n)
    assert not torch.equal(torch.cat(first), torch.cat(other_seed))


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_uninterrupted_stream_exactly(tiny_dataset, num_workers):
    probe = TokenBatchLoader(_cfg(tiny_dataset, num_workers=num_workers))
    bpe = probe.batches_per_epoch
    total = 2 * bpe + 3
    reference = _take(probe, total)
    for k in (1, 3, bpe - 1, bpe, bpe + 2):  # mid-epoch, epoch boundary, inside the second epoch
        first = TokenBatchLoader(_cfg(tiny_dataset, num_workers=num_workers))
        head = _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
        resumed = TokenBatchLoader(_cfg(tiny_dataset, num_workers=num_workers))
        resumed.load_state_dict(state)
        tail = _take(resumed, total - k)
        assert all(torch.equal(x, y) for x, y in zip(head + tail, reference, strict=True)), f"k={k}"


def test_state_records_position_per_worker(tiny_dataset):
    loader = TokenBatchLoader(_cfg(tiny_dataset))
    _take(loader, 3)
    s = loader.state_dict()
    assert (s["epoch"], s["batch_in_epoch"], s["samples_consumed_per_worker"]) == (0, 3, [8, 4])


def test_resume_with_different_stream_settings_is_refused(tiny_dataset):
    loader = TokenBatchLoader(_cfg(tiny_dataset))
    _take(loader, 2)
    state = loader.state_dict()
    other = TokenBatchLoader(_cfg(tiny_dataset, num_workers=1))
    with pytest.raises(DatasetError, match=r"checkpoint has num_workers=2, this run has num_workers=1"):
        other.load_state_dict(state)
    rank1 = TokenBatchLoader(_cfg(tiny_dataset), rank=1, world_size=2)
    with pytest.raises(DatasetError, match=r"checkpoint has rank=0, this run has rank=1"):
        rank1.load_state_dict(state)


def test_world_size_that_cannot_share_shards_equally_is_refused(tiny_dataset):
    with pytest.raises(
        DatasetError,
        match=r"has 8 shards, which 3 rank\(s\) x 2 worker\(s\) cannot share equally.*supported world sizes are \[1, 2, 4\]",
    ):
        TokenBatchLoader(_cfg(tiny_dataset), rank=0, world_size=3)


def test_validation_split_single_pass_in_manifest_order(tiny_dataset):
    cfg = _cfg(tiny_dataset, num_workers=0, batch_size=2)
    a = torch.cat(_take(TokenBatchLoader(cfg, split="val", shuffle=False, loop=False), 10**6))
    b = torch.cat(_take(TokenBatchLoader(cfg, split="val", shuffle=False, loop=False), 10**6))
    assert torch.equal(a, b)
    assert len(a) == load_manifest(tiny_dataset).splits["val"].sequences
