"""Task `pathfinder`: LRA's Pathfinder (Linsley et al. 2018), generated offline: are the two markers connected?

The images are `tasks/pathfinder_data.py`'s (labels right by construction, checked by a flood fill); each
image is read as `resolution`² pixel tokens in row-major order. Model, training and rows: `tasks/lra.py`.
Presets: conf/task/pathfinder.yaml (16×16 for smoke and cpu; 32×32 as LRA; 128×128 is Path-X).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from tasks.base import Section
from tasks.lra import ClassificationTask, Splits, split_seed
from tasks.pathfinder_data import make_pathfinder, plot_examples
from tasks.registry import register_task

EXAMPLES_PNG = "pathfinder_examples_{resolution}_{contour_length}.png"


@register_task
class PathfinderTask(ClassificationTask):
    name = "pathfinder"
    description = "LRA Pathfinder: are two markers joined by a dashed path? pixels as tokens (bidirectional, trained)"
    data_keys = ("resolution", "contour_length", "distractors")

    def seq_len(self, point: Mapping) -> int:
        return int(point["resolution"]) ** 2

    def make_splits(self, point: Mapping, seed: int) -> Splits:
        def split(name: str, n: int):
            data = make_pathfinder(n, point["resolution"], point["contour_length"], split_seed(seed, name),
                                   point["distractors"])  # fmt: skip
            return data.tokens(), data.labels

        sizes = {"train": point["n_train"], "validation": point["n_val"], "test": point["n_test"]}
        parts = {name: split(name, n) for name, n in sizes.items()}
        return Splits(parts["train"], parts["validation"], parts["test"], vocab=256, n_classes=2)

    def report_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        """A few drawn examples of each class per (resolution, contour length) measured."""
        figures = []
        for (res, length), group in rows.groupby(["resolution", "contour_length"], sort=True):
            distractors = group["distractors"].iloc[0]
            data = make_pathfinder(8, int(res), int(length), 0, None if pd.isna(distractors) else int(distractors))
            out_dir.mkdir(parents=True, exist_ok=True)
            figures.append(plot_examples(data, out_dir / EXAMPLES_PNG.format(resolution=int(res), contour_length=int(length))))
        if not figures:
            return []
        return [Section("Pathfinder examples", "Four images of each class (1: the markers are joined).", None, figures)]
