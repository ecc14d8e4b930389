"""Classification metrics against a hand-computed case, and their exactness under any split of the
evaluation data (the counts are what ranks all-reduce)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_train.finetune.classification import SequenceClassification
from ds_train.finetune.metrics import classification_metrics, confusion_counts

NAMES = ["cat", "dog", "eel", "yak"]
# true:      cat cat cat dog dog eel eel eel eel ; yak never occurs and is never predicted
TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2]
PRED = [0, 0, 1, 1, 2, 2, 2, 0, 2]


def test_hand_computed_case():
    counts = confusion_counts(torch.tensor(PRED), torch.tensor(TRUE), len(NAMES))
    m = classification_metrics(counts.numpy().reshape(4, 4), NAMES)
    # confusion rows (true) × columns (predicted): cat [2 1 0], dog [0 1 1], eel [1 0 3]
    assert m["confusion"]["matrix"][:3] == [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0]]
    assert m["accuracy"] == pytest.approx(6 / 9)
    # precision = recall for every class here: cat 2/3, dog 1/2, eel 3/4
    per = m["per_class"]
    assert (per["cat"]["precision"], per["dog"]["recall"], per["eel"]["f1"]) == pytest.approx(
        (2 / 3, 1 / 2, 3 / 4)
    )
    # macro-F1 over the classes present (yak is left out, as scikit-learn does): (2/3 + 1/2 + 3/4) / 3
    assert m["macro_f1"] == pytest.approx(23 / 36)
    assert per["yak"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # the most frequent confusions, largest first (ties in row-major order)
    assert [(c["true"], c["predicted"], c["count"]) for c in m["top_confusions"]] == [
        ("cat", "dog", 1),
        ("dog", "eel", 1),
        ("eel", "cat", 1),
    ]


def test_a_class_never_predicted_scores_zero_and_counts_in_the_average():
    m = classification_metrics(np.array([[3, 0], [2, 0]]), ["a", "b"])
    # a: precision 3/5, recall 1 → F1 3/4; b: never predicted → F1 0
    assert m["macro_f1"] == pytest.approx((3 / 4 + 0) / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)


def test_padding_labels_are_skipped_and_split_counts_sum_to_the_whole():
    labels = torch.tensor([*TRUE, -100, -100])  # evaluation padding past the end of the split
    preds = torch.tensor([*PRED, 3, 3])
    whole = confusion_counts(preds, labels, 4)
    parts = confusion_counts(preds[:4], labels[:4], 4) + confusion_counts(preds[4:], labels[4:], 4)
    assert torch.equal(whole, parts) and whole.sum() == 9


class _FixedLogits(torch.nn.Module):
    """A 'model' whose logits are one-hot predictions (the objective only reads .logits)."""

    def __init__(self, predictions: list[int], num_classes: int):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float() * 5

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.logits[: len(input_ids)]})()


def test_objective_eval_step_and_metrics():
    objective = SequenceClassification(NAMES)
    arrays = {
        "tokens": np.arange(9 * 6).reshape(9, 6) % 50,
        "lengths": np.array([6, 3, 2, 6, 1, 4, 5, 6, 2]),
        "labels": np.array(TRUE),
    }
    batch = objective.collate(arrays, np.arange(9))
    assert batch["input_ids"].shape == (9, 6) and batch["attention_mask"].sum() == arrays["lengths"].sum()
    assert batch["num_targets"] == 9  # one target per example
    loss, stats = objective.eval_step(_FixedLogits(PRED, 4), batch)
    record = objective.eval_metrics(stats)
    assert record["valid_accuracy"] == pytest.approx(6 / 9)
    assert record["valid_macro_f1"] == pytest.approx(23 / 36)
    assert record["valid_examples"] == 9
    expected = torch.nn.functional.cross_entropy(
        _FixedLogits(PRED, 4).logits, torch.tensor(TRUE), reduction="sum"
    )
    assert float(loss) == pytest.approx(float(expected))


def test_balanced_class_weights_average_one_over_the_training_examples():
    from ds_train.finetune.classification import class_weights

    counts = {"a": 60, "b": 30, "c": 10}
    w = class_weights("balanced", ["a", "b", "c"], counts)
    assert w == pytest.approx([100 / 180, 100 / 90, 100 / 30])  # n / (k × count): the rare class weighs most
    assert sum(w[i] * c for i, c in enumerate(counts.values())) / 100 == pytest.approx(1.0)
    assert class_weights("balanced", ["a", "b", "z"], counts)[2] == 0.0  # no train example: no weight
    assert class_weights("none", ["a"], counts) is None and class_weights([1, 2], ["a", "b"], {}) == [
        1.0,
        2.0,
    ]


def test_class_weights_weigh_the_training_loss_and_never_the_validation_loss():
    arrays = {
        "tokens": np.arange(9 * 6).reshape(9, 6) % 50,
        "lengths": np.full(9, 6),
        "labels": np.array(TRUE),
    }
    weights = [0.5, 1.0, 2.0, 4.0]
    plain, weighted = SequenceClassification(NAMES), SequenceClassification(NAMES, class_weights=weights)
    batch = plain.collate(arrays, np.arange(9))
    model = _FixedLogits(PRED, 4)
    per_example = torch.nn.functional.cross_entropy(model.logits, torch.tensor(TRUE), reduction="none")
    expected = sum(weights[y] * float(ce) for y, ce in zip(TRUE, per_example))
    assert float(weighted.loss_sum(model, batch)) == pytest.approx(expected)
    assert float(plain.loss_sum(model, batch)) == pytest.approx(float(per_example.sum()))
    assert batch["num_targets"] == 9  # the trainer's divisor: examples, as without weights
    assert float(weighted.eval_step(model, batch)[0]) == pytest.approx(float(per_example.sum()))
