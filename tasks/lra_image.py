"""Task `lra_image`: LRA Image, CIFAR-10 as 1,024 grayscale 8-bit pixel tokens (LRA's rgb_to_grayscale).

Data through `datasets` (`tasks/lra_datasets.py`): the hub name on a connected machine, or local files
(`task.data_files=...`); a missing dataset is a one-line error saying how to provide it. Model, training
and rows: `tasks/lra.py`. Presets: conf/task/lra_image.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping

from tasks.lra import ClassificationTask, Splits, loaded_splits
from tasks.lra_datasets import IMAGE_VOCAB, lra_image
from tasks.registry import register_task


@register_task
class LRAImageTask(ClassificationTask):
    name = "lra_image"
    description = "LRA Image: CIFAR-10 as 1,024 grayscale pixel tokens, 10 classes (bidirectional, trained)"
    data_keys = ("source", "data_files")

    def seq_len(self, point: Mapping) -> int:
        return 32 * 32

    def make_splits(self, point: Mapping, seed: int) -> Splits:
        parts = loaded_splits(lra_image, point, seed)
        pair = {name: (data.inputs, data.labels) for name, data in parts.items()}
        return Splits(pair["train"], pair["validation"], pair["test"], IMAGE_VOCAB, 10, None)  # 0 is black
