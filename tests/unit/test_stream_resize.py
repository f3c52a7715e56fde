"""The data stream across an elastic resume: the rest of the epoch is read exactly once, in the
global batches the old layout would have trained on; then the next epoch splits for the new layout."""

from __future__ import annotations

import itertools

import pytest

from pipeline.dataset.manifest import DatasetError
from pipeline.loader.stream import DataConfig, TokenBatchLoader


def _loader(dataset, rank: int, world: int, workers: int = 1) -> TokenBatchLoader:
    cfg = DataConfig(path=str(dataset), batch_size=2, num_workers=0, shuffle_buffer=16, seed=3)
    loader = TokenBatchLoader(cfg, rank=rank, world_size=world)
    if workers != 0:  # logical workers define the order; read in-process in the test
        loader._plan_args["num_workers"] = workers
        loader.num_workers = 0
    return loader


def _global_batches(dataset, world: int, grad_accum: int, steps: int) -> list[list[int]]:
    """Sample indices of each step's global batch of an uninterrupted run (slot order)."""
    streams = [iter(_loader(dataset, r, world)) for r in range(world)]
    out = []
    for _ in range(steps):
        step = []
        for stream in streams:
            for _ in range(grad_accum):
                step.extend(next(stream)["index"].tolist())
        out.append(step)
    return out


def _resized(dataset, old_world, old_ga, new_world, new_ga, done_steps):
    """Old layout trains ``done_steps``; the new layout continues; returns its loaders."""
    old = [_loader(dataset, r, old_world) for r in range(old_world)]
    for loader in old:
        it = iter(loader)
        for _ in range(done_steps * old_ga):
            next(it)
    states = [loader.state_dict() for loader in old]
    new = [_loader(dataset, r, new_world) for r in range(new_world)]
    for loader in new:
        loader.load_resized_state(states, old_ga, new_ga)
    return new


@pytest.mark.parametrize(("old", "new"), [((2, 1), (1, 2)), ((1, 2), (2, 1))], ids=["dp2to1", "dp1to2"])
def test_after_a_resize_the_rest_of_the_epoch_is_read_once_in_the_old_global_batches(tiny_dataset, old, new):
    (old_world, old_ga), (new_world, new_ga) = old, new
    epoch_steps = _loader(tiny_dataset, 0, old_world).batches_per_epoch // old_ga
    reference = _global_batches(tiny_dataset, old_world, old_ga, epoch_steps)
    done = 3
    loaders = _resized(tiny_dataset, old_world, old_ga, new_world, new_ga, done)
    streams = [iter(loader) for loader in loaders]
    resumed = []
    for _ in range(epoch_steps - done):
        step = []
        for stream in streams:
            for _ in range(new_ga):
                step.extend(next(stream)["index"].tolist())
        resumed.append(step)
    assert resumed == reference[done:]  # the same global batches, slot for slot
    seen = list(itertools.chain(*reference[:done], *resumed))
    assert len(seen) == len(set(seen))  # nothing twice ...
    epoch = {i for step in reference for i in step}
    assert set(seen) == epoch  # ... nothing skipped
    assert not any(loader.carrying for loader in loaders)
    # then the next epoch, split for the new layout as if the run had always had it
    for r, stream in enumerate(streams):
        fresh = _loader(tiny_dataset, r, new_world)
        fresh.epoch = 1
        assert next(stream)["index"].tolist() == next(iter(fresh))["index"].tolist()


def _steps(streams, grad_accum: int, steps: int) -> list[list[int]]:
    """The next ``steps`` global batches of ``streams`` (one per DP rank), in slot order."""
    return [
        [i for stream in streams for _ in range(grad_accum) for i in next(stream)["index"].tolist()]
        for _ in range(steps)
    ]


@pytest.mark.parametrize("before_end", [0, 1], ids=["at_the_boundary", "one_step_before"])
def test_a_resize_at_an_epoch_boundary_reads_each_epoch_like_the_uninterrupted_runs(tiny_dataset, before_end):
    """DP=4 x grad_accum 2 -> DP=2 x grad_accum 4 when epoch 0 is done (or has one step left): the
    rest of epoch 0 is the DP=4 run's, and epochs 1 and 2 are those of a run that always had DP=2
    (the next epoch is split for the new layout), with no sample read twice or skipped."""
    old_world, old_ga, new_world, new_ga = 4, 2, 2, 4
    epoch_steps = _loader(tiny_dataset, 0, old_world).batches_per_epoch // old_ga
    assert epoch_steps == _loader(tiny_dataset, 0, new_world).batches_per_epoch // new_ga
    done = epoch_steps - before_end
    old_run = _global_batches(tiny_dataset, old_world, old_ga, epoch_steps)
    always_new = _steps(
        [iter(_loader(tiny_dataset, r, new_world)) for r in range(new_world)], new_ga, 3 * epoch_steps
    )
    loaders = _resized(tiny_dataset, old_world, old_ga, new_world, new_ga, done)
    assert [loader.carrying for loader in loaders] == [before_end > 0] * new_world
    streams = [iter(loader) for loader in loaders]
    assert _steps(streams, new_ga, before_end) == old_run[done:]  # the rest of epoch 0, as DP=4 had it
    assert not any(loader.carrying for loader in loaders)
    for loader in loaders:  # a checkpoint here resumes at the start of epoch 1, nothing carried
        state = loader.state_dict()
        assert (state["epoch"], state["batch_in_epoch"], state["carry"]) == (1, 0, None)
    resumed = _steps(streams, new_ga, 2 * epoch_steps)
    assert resumed == always_new[epoch_steps:]  # epochs 1 and 2: exactly the DP=2 run's
    epoch0 = [i for step in old_run for i in step]
    assert len(epoch0) == len(set(epoch0))
    for e in range(2):  # each later epoch reads the same samples as epoch 0, once each
        epoch = [i for step in resumed[e * epoch_steps : (e + 1) * epoch_steps] for i in step]
        assert sorted(epoch) == sorted(epoch0)


def test_a_checkpoint_taken_during_the_carried_over_epoch_resumes_it_exactly(tiny_dataset):
    (loader,) = _resized(tiny_dataset, 2, 1, 1, 2, 2)
    stream = iter(loader)
    first = [next(stream)["index"].tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state["carry"]["position"] == 3
    rest = [next(stream)["index"].tolist() for _ in range(4)]
    again = _loader(tiny_dataset, 0, 1)
    again.load_state_dict(state)
    assert again.carrying
    assert [next(iter_)["index"].tolist() for iter_ in [iter(again)] for _ in range(4)] == rest
    assert first != rest


def test_a_resize_that_changes_the_global_batch_is_refused_with_the_numbers(tiny_dataset):
    old = [_loader(tiny_dataset, r, 2) for r in range(2)]
    states = [loader.state_dict() for loader in old]
    with pytest.raises(
        DatasetError, match=r"2 rank\(s\) x grad_accum 1 read 2 micro-batches per step, this layout 1 x 1"
    ):
        _loader(tiny_dataset, 0, 1).load_resized_state(states, 1, 1)
