"""Task `lra_text`: LRA Text, byte-level IMDB sentiment (Maas et al. 2011) read as UTF-8 bytes.

Data through `datasets` (`tasks/lra_datasets.py`): the hub name on a connected machine, or local files
(`task.data_files=...`); a missing dataset is a one-line error saying how to provide it. Model, training
and rows: `tasks/lra.py`. Presets: conf/task/lra_text.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping

from tasks.lra import ClassificationTask, Splits, loaded_splits
from tasks.lra_datasets import PAD_ID, TEXT_VOCAB, lra_text
from tasks.registry import register_task


@register_task
class LRATextTask(ClassificationTask):
    name = "lra_text"
    description = "LRA Text: byte-level IMDB sentiment, 2 classes (bidirectional, trained; data via datasets)"
    data_keys = ("source", "data_files", "max_len")

    def seq_len(self, point: Mapping) -> int:
        return int(point["max_len"])

    def make_splits(self, point: Mapping, seed: int) -> Splits:
        parts = loaded_splits(lra_text, point, seed, max_len=point["max_len"])
        pair = {name: (data.inputs, data.labels) for name, data in parts.items()}
        return Splits(pair["train"], pair["validation"], pair["test"], TEXT_VOCAB, 2, PAD_ID)
