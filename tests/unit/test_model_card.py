"""The model card's usage snippet encodes inputs the way the model was trained on them."""

from __future__ import annotations

import pytest

from ds_train.finetune.model_card import render_model_card


def _card(text_pair: bool) -> str:
    return render_model_card(
        name="m",
        task="classification",
        architecture="BertForSequenceClassification",
        num_params=10,
        base_model="base",
        adapter=None,
        data={},
        train={
            "steps": 1,
            "global_batch_size": 8,
            "world_size": 1,
            "lr": 1e-4,
            "schedule": "cosine",
            "precision": "fp32",
            "zero_stage": 2,
        },
        config_yaml="run: {}",
        final_train={},
        final_eval={"valid_accuracy": 0.9},
        text_pair=text_pair,
    )


@pytest.mark.parametrize("text_pair", [False, True])
def test_a_pair_classifier_is_shown_called_with_two_texts(text_pair):
    """The card told users of a sentence-pair model to encode one text (review)."""
    card = _card(text_pair)
    assert ('tokenizer("first text", "second text"' in card) is text_pair
    assert ('tokenizer("some text"' in card) is not text_pair
