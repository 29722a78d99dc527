"""Errors of the Python API that a Hugging Face or new user meets first (issue 31, items 12
and 18): each names what to pass instead, in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from cases import tiny_bert

TASK = 'di.tasks.classification() (in a job file: [task] name = "classification"'


def _tiny_bert():
    pytest.importorskip("transformers")
    return tiny_bert()


def test_a_hugging_face_model_with_a_plain_loss_names_the_classification_task():
    """Was `cross_entropy_loss(): argument 'input' (position 1) must be Tensor, not
    SequenceClassifierOutput`."""
    model, ids, y = _tiny_bert()
    solver = di.DirectInfluence(model, nn.CrossEntropyLoss(), regularization=0.1)
    with pytest.raises(ValueError) as info:
        solver.fit(DataLoader(TensorDataset(ids, y), batch_size=7))
    text = str(info.value)
    assert "The model returned a SequenceClassifierOutput (a Hugging Face output with .logits), which the loss" in text
    assert 'pass di.tasks.classification() as the loss (in a job file: [task] name = "classification")' in text
    # and the task it names works on the same model and data
    batch = {"input_ids": ids, "labels": y}
    task = di.DirectInfluence(model, di.tasks.classification(), regularization=0.1, curvature="ggn").fit(batch)
    assert torch.isfinite(task.influences(batch, batch)).all()


def test_dict_batches_with_a_pair_loss_name_the_task():
    """Was `Training batches must be (x, y) pairs; got str` for a dict of whole arrays (its keys
    were taken as batches)."""
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    solver = di.DirectInfluence(nn.Linear(4, 3).double(), nn.CrossEntropyLoss(), regularization=0.1)
    with pytest.raises(
        TypeError, match=r"The training data is a dict with keys features, labels: a loss\(outputs, "
    ) as info:
        solver.fit({"features": x, "labels": y})
    assert TASK in str(info.value) and "got str" not in str(info.value)
    items = [{"features": x[i], "labels": y[i]} for i in range(12)]
    with pytest.raises(TypeError, match=r"got a dict with keys features, labels: a loss\(outputs, targets\)") as info:
        solver.fit(DataLoader(items, batch_size=4))
    assert TASK in str(info.value)
    solver.fit((x, y))
    with pytest.raises(TypeError, match=r"^Got a dict batch: a loss\(outputs, targets\) takes \(x, y\) pairs") as info:
        solver.influences({"features": x[:2], "labels": y[:2]}, x, y)
    assert TASK in str(info.value)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x), x


def tuple_loss(outputs, y):
    logits, _ = outputs
    return F.cross_entropy(logits, y)


def test_a_model_returning_a_tuple_with_a_loss_of_tuples_works_or_is_refused_in_one_line():
    """Was `AttributeError: 'tuple' object has no attribute 'detach'` for the GGN, EK-FAC and the index."""
    torch.manual_seed(0)
    model = TupleOut().double().eval()
    plain = model.lin  # the same weights, returning the logits alone
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    hessian = di.DirectInfluence(model, tuple_loss, regularization=0.1).fit((x, y))
    reference = di.DirectInfluence(plain, nn.CrossEntropyLoss(), regularization=0.1).fit((x, y))
    torch.testing.assert_close(hessian.influences(x[:5], y[:5], x, y), reference.influences(x[:5], y[:5], x, y))
    refusal = (
        r"^The model returned a tuple, not one tensor of outputs: curvature='ggn', EK-FAC and the gradient "
        r"index's curvature preconditioners need the outputs the loss reads as one tensor\. Use "
        r"curvature='hessian' \(Direct, CG, LiSSA, Arnoldi, Nystroem\) or an index with preconditioner='none'"
    )
    with pytest.raises(TypeError, match=refusal):
        di.DirectInfluence(model, tuple_loss, regularization=0.1, curvature="ggn").fit((x, y))
    with pytest.raises(TypeError, match=refusal):
        di.EkfacInfluence(model, tuple_loss, regularization=0.1).fit((x, y))


def test_a_model_returning_a_tuple_is_indexed_without_a_curvature_preconditioner_or_refused(tmp_path):
    torch.manual_seed(0)
    model = TupleOut().double().eval()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    train = DataLoader(TensorDataset(x, y), batch_size=10)
    with pytest.raises(TypeError, match=r"^The model returned a tuple, not one tensor of outputs"):
        di.GradientIndex.build(model, tuple_loss, train, tmp_path / "a.zarr", projection_dim=4, client="sync")
    index = di.GradientIndex.build(
        model, tuple_loss, train, tmp_path / "b.zarr", projection_dim=4, client="sync", preconditioner="none"
    )
    plain = di.GradientIndex.build(
        model.lin,
        nn.CrossEntropyLoss(),
        train,
        tmp_path / "c.zarr",
        projection_dim=4,
        client="sync",
        preconditioner="none",
    )
    torch.testing.assert_close(
        torch.as_tensor(index.influences((x[:3], y[:3]))), torch.as_tensor(plain.influences((x[:3], y[:3])))
    )


def test_random_operations_in_eval_are_refused_as_hidden_randomness():
    """Was torch's `vmap: called random operation while in randomness error mode`."""

    class RandomInEval(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(F.dropout(x, p=0.5, training=True))

    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match=r"^The model draws random numbers in its forward even in eval\(\)"):
        solver = di.CgInfluence(RandomInEval().double().eval(), nn.CrossEntropyLoss(), regularization=0.1)
        solver.fit((x, y)).influences(x[:2], y[:2], x, y)  # per-sample gradients, by vmap


@pytest.mark.parametrize("bad", [3, -1])
def test_labels_out_of_range_name_the_labels_and_classes_in_the_api(bad):
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    y[13] = bad
    solver = di.DirectInfluence(nn.Linear(4, 3).double(), di.tasks.classification(), regularization=0.1)
    with pytest.raises(
        ValueError, match=rf"Labels out of range for the model's 3 classes: got {bad} \(1 target\(s\)\)"
    ):
        solver.fit(DataLoader(TensorDataset(x, y), batch_size=10))
    ok = y.clone()
    ok[13] = -100  # the ignored target is not out of range
    solver.fit(DataLoader(TensorDataset(x, ok), batch_size=10))
