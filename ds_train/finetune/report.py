"""Rank-0 console lines for fine-tuning evaluations (classification: accuracy, macro-F1 and the
most frequent confusions), next to the standard progress output."""

from __future__ import annotations

import sys

from ds_train.train.callbacks.base import Callback


class EvalReport(Callback):
    def on_eval(self, trainer, record: dict) -> None:
        if "valid_accuracy" not in record:
            return
        line = (
            f"eval step {record['step']}: accuracy {record['valid_accuracy']:.3f}, "
            f"macro-F1 {record['valid_macro_f1']:.3f} on {record['valid_examples']} examples"
        )
        confusions = record.get("valid_top_confusions") or []
        if confusions:
            line += "; most confused (true→predicted): " + ", ".join(
                f"{c['true']}→{c['predicted']} {c['count']}" for c in confusions
            )
        print(line, file=sys.stderr, flush=True)
