import pytest
import torch

from ftlab.data._base import ResumableLoader, ResumableSampler, _batches_per_epoch


class _Trainer:
    """What the sampler reads from a Lightning trainer that is not restoring a checkpoint."""

    def __init__(self, world: int, rank: int):
        self.distributed_sampler_kwargs = {"num_replicas": world, "rank": rank}
        self.fit_loop = None


def test_ranks_split_each_global_batch_of_the_single_process_order():
    items = list(range(64))
    single = list(ResumableSampler(items, seed=3))
    ranks = [list(ResumableSampler(items, seed=3, trainer=_Trainer(2, r))) for r in (0, 1)]
    assert sorted(single) == items and single != items  # a permutation, shuffled
    for step in range(4):  # global batch 16 = 8 per rank
        shards = ranks[0][step * 8 : (step + 1) * 8] + ranks[1][step * 8 : (step + 1) * 8]
        assert sorted(shards) == sorted(single[step * 16 : (step + 1) * 16])


def test_order_depends_on_seed_and_epoch_only():
    a, b = ResumableSampler(list(range(32)), seed=0), ResumableSampler(list(range(32)), seed=0)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b) and sorted(b) == list(range(32))
    assert list(ResumableSampler(list(range(32)), seed=1)) != list(a)


def test_skip_applies_once():
    s = ResumableSampler(list(range(20)), seed=0)
    whole = list(s)
    s.skip = 8
    assert list(s) == whole[8:] and list(s) == whole


@pytest.mark.parametrize(("limit", "expected"), [(None, 10), (1.0, 10), (0.5, 5), (4, 4), (40, 10)])
def test_batches_per_epoch_follows_limit_train_batches(limit, expected):
    assert _batches_per_epoch(10, limit) == expected


def test_resuming_with_another_batch_size_warns():
    items = list(range(32))
    saved = ResumableLoader(items, batch_size=8, sampler=ResumableSampler(items, seed=0)).state_dict()
    same = ResumableLoader(items, batch_size=8, sampler=ResumableSampler(items, seed=0))
    same.load_state_dict(saved)  # no warning
    other = ResumableLoader(items, batch_size=4, sampler=ResumableSampler(items, seed=0))
    with pytest.warns(UserWarning, match="batch_size 8 -> 4"):
        other.load_state_dict(saved)
    assert isinstance(next(iter(same)), torch.Tensor)
