import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from pipebd.data import BatchOrder, StepRows, load_rows


def test_batches_depend_on_seed_only_and_cover_each_epoch():
    order = BatchOrder(length=10, batch_size=4, seed=7)
    again = BatchOrder(length=10, batch_size=4, seed=7)
    stream = torch.cat([order.indices(t) for t in range(5)])  # 20 rows = 2 epochs
    assert torch.equal(stream, torch.cat([again.indices(t) for t in range(5)]))
    first, second = stream[:10], stream[10:]
    assert sorted(first.tolist()) == list(range(10)) and sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)  # reshuffled each epoch
    assert not torch.equal(stream, torch.cat([BatchOrder(10, 4, seed=8).indices(t) for t in range(5)]))


def test_slices_of_a_batch_concatenate_to_the_batch():
    order = BatchOrder(length=6, batch_size=5, seed=0)
    for t in range(4):  # batches cross epoch boundaries
        whole = order.indices(t)
        parts = torch.cat([order.indices(t, 0, 2), order.indices(t, 2, 3), order.indices(t, 3, 5)])
        assert torch.equal(whole, parts)


def test_dataset_smaller_than_a_batch():
    order = BatchOrder(length=3, batch_size=7, seed=1)
    batch = order.indices(0)
    assert len(batch) == 7 and set(batch.tolist()) == {0, 1, 2}


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="dataset is empty"):
        BatchOrder(0, 4, 0)


class Pairs(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.full((2,), float(i)), i * 10


def test_load_rows_from_tensors_and_datasets():
    index = torch.tensor([3, 1])
    x = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(load_rows(x, index)[0], x[index])
    xs, ys = load_rows(TensorDataset(x, torch.arange(5)), index)
    assert torch.equal(xs, x[index]) and ys.tolist() == [3, 1]
    xs, ys = load_rows(Pairs(), index)
    assert xs.tolist() == [[3.0, 3.0], [1.0, 1.0]] and ys.tolist() == [30, 10]


class Shifted(TensorDataset):
    """A TensorDataset whose ``__getitem__`` transforms: rows + 100 + uniform noise."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 100 + torch.rand(x.shape), y


class NumpyShifted(Shifted):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + float(np.random.rand()) + random.random(), y


def test_samples_are_read_under_their_own_seeds():
    x = torch.zeros(5, 2)
    index = torch.tensor([3, 1, 3])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    xs, ys = load_rows(Shifted(x, torch.arange(5)), index, seeds=[7, 8, 7])
    assert torch.equal(torch.get_rng_state(), before)   # the caller's generator is left alone
    np_state, py_state = np.random.get_state(), random.getstate()
    drawn = [load_rows(NumpyShifted(x, torch.arange(5)), index, seeds=[7, 8, 7])[0] for _ in range(2)]
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0][0], drawn[0][2])   # numpy and random too
    assert not torch.equal(drawn[0][0], drawn[0][1])
    assert random.getstate() == py_state and all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))
    noise = [torch.rand(2, generator=torch.Generator().manual_seed(s)) for s in (7, 8, 7)]
    assert torch.equal(xs, 100 + torch.stack(noise)) and ys.tolist() == [3, 1, 3]
    # A batch's rows get the seeds of their places in the run: step * batch_size + row, so a
    # slice of a batch draws what the same rows of the whole batch draw.
    rows = StepRows(BatchOrder(5, 4, seed=1), [2], 1, 3)
    whole = StepRows(BatchOrder(5, 4, seed=1), [2], 0, 4)
    assert rows.seeds(0) == whole.seeds(0)[1:3]
    assert torch.equal(rows.load(Shifted(x, torch.arange(5)), 0)[0], whole.load(Shifted(x, torch.arange(5)), 0)[0][1:3])


def test_labelled_tasks_are_seeded_and_split_without_overlap():
    from pipebd import datasets

    x, y = datasets.synthetic(500, features=6, classes=3, seed=1)
    assert x.shape == (500, 6) and y.dtype == torch.long and set(y.tolist()) == {0, 1, 2}
    x2, y2 = datasets.synthetic(500, features=6, classes=3, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(y, datasets.synthetic(500, features=6, classes=3, seed=2)[1])
    train, (tx, ty) = datasets.split(x, y, test_rows=100)
    assert len(train) == 400 and len(tx) == len(ty) == 100
    rows = torch.cat([train.tensors[0], tx])            # every row once: the split is a permutation
    assert torch.equal(rows[rows[:, 0].argsort()], x[x[:, 0].argsort()])
    with pytest.raises(ValueError, match="classes must be an integer >= 2"):
        datasets.synthetic(10, classes=1)
    with pytest.raises(ValueError, match="test rows must be between 1 and 9"):
        datasets.split(x[:10], y[:10], test_rows=10)
    with pytest.raises(ValueError, match="test rows must be an integer >= 1, got True"):
        datasets.split(x[:10], y[:10], test_rows=True)
    assert torch.equal(datasets.synthetic(np.int64(20), features=np.int32(6))[0], datasets.synthetic(20, features=6)[0])


class Detections(Dataset):
    """Items ``(x, boxes)`` whose second fields differ in size: they do not collate."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], torch.zeros(i % 3 + 1, 4)


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 1)])
def test_second_fields_no_loss_takes_are_not_loaded(world_size, num_workers):
    # Before: "stack expects each tensor to be equal size" from labels nothing would read.
    import pipebd
    from pipebd.models import mlp_pair
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    runs = []
    for data in (x, Detections(x)):
        teacher, student = mlp_pair(num_blocks=2, seed=0)
        distiller = pipebd.Distiller(teacher, student, device="cpu")
        distiller.fit(data, batch_size=6, steps=3, world_size=world_size, num_workers=num_workers, timeout=60)
        runs.append(list(distiller.student_model().parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert load_rows(Detections(x), torch.arange(4), labels=False)[1] is None
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        load_rows(Detections(x), torch.arange(4))
