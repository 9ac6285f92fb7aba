"""Task `lra_retrieval`: LRA Retrieval, AAN document pairs (Radev et al. 2013): does document 1 cite document 2?

Both documents are read as bytes by one shared encoder (two towers), combined as [u, v, u*v, u-v]
(`tasks/model.py` DualEncoderClassifier, LRA's feature combination). Data: LRA's released
`new_aan_pairs.{train,eval,test}.tsv` through `task.data_files=...` (`tasks/lra_datasets.py`); a missing
dataset is a one-line error saying how to provide it. Presets: conf/task/lra_retrieval.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping

from tasks.lra import ClassificationTask, Splits, loaded_splits
from tasks.lra_datasets import PAD_ID, TEXT_VOCAB, lra_retrieval
from tasks.registry import register_task


@register_task
class LRARetrievalTask(ClassificationTask):
    name = "lra_retrieval"
    description = "LRA Retrieval: AAN citation pairs, byte level, two-tower encoder, 2 classes (trained)"
    data_keys = ("source", "data_files", "max_len")
    pair_input = True

    def seq_len(self, point: Mapping) -> int:
        return int(point["max_len"])  # per document; the model reads (batch, 2 * max_len), split in the middle

    def make_splits(self, point: Mapping, seed: int) -> Splits:
        parts = loaded_splits(lra_retrieval, point, seed, max_len=point["max_len"])
        pair = {name: (data.concatenated(), data.labels) for name, data in parts.items()}
        return Splits(pair["train"], pair["validation"], pair["test"], TEXT_VOCAB, 2, PAD_ID)
