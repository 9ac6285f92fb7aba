"""Task `listops`: LRA's ListOps (Nangia & Bowman 2018), generated offline: the value (0-9) of a nested expression.

The data is `tasks/listops_data.py` (LRA's generator, written from its description; labels checked by an
independent evaluator); the model, training and rows are `tasks/lra.py`'s. Presets: conf/task/listops.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping

from tasks.listops_data import NUM_CLASSES, PAD_ID, VOCAB_SIZE, make_listops_splits
from tasks.lra import ClassificationTask, Splits
from tasks.registry import register_task


@register_task
class ListOpsTask(ClassificationTask):
    name = "listops"
    description = "LRA ListOps: 10-way classification of nested MIN/MAX/MED/SM expressions (bidirectional, trained)"
    data_keys = ("max_depth", "max_args", "min_len", "max_len", "keep_close")

    def seq_len(self, point: Mapping) -> int:
        return int(point["max_len"])

    def make_splits(self, point: Mapping, seed: int) -> Splits:
        splits = make_listops_splits(
            point["n_train"], point["n_val"], point["n_test"], seed, max_depth=point["max_depth"],
            max_args=point["max_args"], min_len=point["min_len"], max_len=point["max_len"],
            keep_close=point["keep_close"],
        )  # fmt: skip
        pair = {name: (data.inputs, data.labels) for name, data in splits.items()}
        return Splits(pair["train"], pair["val"], pair["test"], VOCAB_SIZE, NUM_CLASSES, PAD_ID)
