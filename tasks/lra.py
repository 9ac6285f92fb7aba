"""Long Range Arena (Tay et al. 2021): sequence classification by a bidirectional encoder trained from scratch.

LRA is the table every efficient-attention paper of 2020-2023 reports, and its
numbers are hard to reproduce (the paper's and the code's configurations
disagree). Each LRA task here is a `ClassificationTask`: it makes its three
splits, trains `tasks/model.py`'s encoder (the cell's method as mixer, called
with causal=False, a pooled classification head) with `tasks/trainer.py`,
keeps the checkpoint that is best on the validation split, and reports its
accuracy on the test split, beside the majority-class rate of that split.

Presets. A task's YAML holds named presets (`smoke`, `cpu`, `small` = the
Nyströmformer paper's PyTorch re-run, `full` = LRA's own configuration), each
with the source of its numbers; `preset` picks one, and any key given as well
(`task.lr=...`) overrides the preset's value. The resolved values, not the
preset's name alone, make the cell id, so editing a preset makes new cells.

What differs from LRA's JAX code, by design: no dropout; AdamW with linear
warm-up and cosine decay for every preset (LRA's ListOps uses an rsqrt decay);
q/k/v width equal to the model width (LRA's `qkv_dim` may be smaller).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from methods import get_impl
from tasks.base import (
    LATENCY,
    PEAK_MEMORY,
    AttentionFactory,
    Cell,
    Metric,
    RunContext,
    Section,
    SummaryColumn,
    Task,
    quality_with_latency,
)
from tasks.model import DualEncoderClassifier, MixerModel, ModelConfig, check_trainable, forward_latency
from tasks.presets import check_ints, resolve_preset
from tasks.trainer import TrainConfig, Trainer, evaluate

# LRA's columns, in the paper's order, and the task that fills each.
LRA_COLUMNS = {"listops": "ListOps", "lra_text": "Text", "lra_retrieval": "Retrieval", "lra_image": "Image",
               "pathfinder": "Pathfinder"}  # fmt: skip
# Published test accuracies (%), printed beside ours and marked as published.
PUBLISHED = (
    ("LRA paper: Transformer", "Tay et al. 2021, Long Range Arena, Table 1", (36.37, 64.27, 57.46, 42.44, 71.40), 54.39),
    ("Nyströmformer paper: softmax, PyTorch re-run", "Xiong et al. 2021, Nyströmformer, Table 4",
     (37.10, 65.02, 79.35, 38.20, 74.16), 58.77),
)  # fmt: skip
SPLIT_SALT = {"train": 1, "validation": 2, "test": 3}
# The keys every LRA task shares (model and training); a task adds its data keys.
MODEL_KEYS = ("preset", "n_train", "n_val", "n_test", "d_model", "n_layers", "n_heads", "mlp_ratio", "positions",
              "pooling", "lr", "steps", "batch_size", "warmup_frac", "weight_decay", "grad_clip", "eval_every",
              "time_budget_s")  # fmt: skip
INT_KEYS = ("n_train", "n_val", "n_test", "d_model", "n_layers", "n_heads", "mlp_ratio", "steps", "batch_size",
            "eval_every")  # fmt: skip


@dataclass
class Splits:
    """Token ids (n, seq_len) and labels (n,) per split, with what the model needs to know about them."""

    train: tuple[torch.Tensor, torch.Tensor]
    validation: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    vocab: int
    n_classes: int
    pad_id: int | None = None  # left out of mean pooling


def loaded_splits(load, point: Mapping, seed: int, **kwargs) -> dict[str, object]:
    """The three splits of a dataset task from its loader (`tasks/lra_datasets.py`), each cut to n_<split>.

    The validation split, where the source has none, is carved from train with the run seed."""
    sizes = {"train": point["n_train"], "validation": point["n_val"], "test": point["n_test"]}
    files = point.get("data_files")
    return {split: load(split, source=point.get("source"), data_files=dict(files) if isinstance(files, Mapping)
                        else files, limit=n, seed=seed, **kwargs) for split, n in sizes.items()}  # fmt: skip


def split_seed(seed: int, split: str) -> int:
    """Disjoint generator seeds per split, derived from the run seed."""
    return seed * 7919 + SPLIT_SALT[split]


def majority_rate(labels: torch.Tensor) -> float:
    """The accuracy of always answering the most common class of this split: the floor a model must beat."""
    return float(torch.bincount(labels).max()) / max(1, len(labels))


class ClassificationTask(Task):
    """An LRA-style task: its data (`make_splits`), a bidirectional encoder, test accuracy against the majority."""

    trains = True
    data_keys: tuple[str, ...] = ()
    metrics = (
        Metric("accuracy", "fraction", "higher", "drop", "test accuracy"),
        Metric("majority_rate", "fraction", None, None, "majority-class rate (test)"),
        Metric("val_accuracy", "fraction", "higher", None, "validation accuracy (picks the checkpoint)"),
        LATENCY,  # the trained encoder's forward pass on one test batch
        Metric("train_seconds", "s", "lower", None, "training time"),
        Metric("tokens_per_s", "tokens/s", "higher", None, "training tokens/s"),
        Metric("steps_done", "", None, None, "steps"),
        PEAK_MEMORY,
        Metric("n_params", "", None, None, "parameters"),
    )
    headline = "accuracy"
    pareto = ("latency_ms", "accuracy")
    section_group = "lra"
    pair_input = False  # True: each example is two documents, read by a two-tower `DualEncoderClassifier`

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.keys = (*MODEL_KEYS, *cls.data_keys, "presets")  # presets: read by normalise_point, never in a row

    @abc.abstractmethod
    def make_splits(self, point: Mapping, seed: int) -> Splits:
        """The three splits of the point's data, a pure function of the point and the seed."""

    @abc.abstractmethod
    def seq_len(self, point: Mapping) -> int:
        """The model's input length for the point (padded length, or pixels per image)."""

    def normalise_point(self, point: dict) -> dict | None:
        """Resolve the preset (explicit keys win), validate, and derive the shape columns every row has."""
        point = resolve_preset(self.name, point, self.keys)
        check_ints(self.name, point, INT_KEYS, zero_ok=("mlp_ratio",))
        if not float(point["lr"]) > 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {point['lr']!r}")
        point["lr"] = float(point["lr"])
        if point["d_model"] % point["n_heads"]:
            raise ValueError(f"{self.name}: d_model ({point['d_model']}) must be divisible by n_heads ({point['n_heads']})")
        n = self.seq_len(point)
        point.update(dtype="float32", causal=False, mode="train", heads=point["n_heads"],
                     head_dim=point["d_model"] // point["n_heads"], batch=point["batch_size"], seq_len=n, kv_len=n)  # fmt: skip
        return point

    def splits(self, point: Mapping, seed: int) -> Splits:
        """`make_splits`, kept for the last point: every method of a point trains on the same data, made once."""
        key = (seed, *(repr(point.get(k)) for k in (*self.data_keys, "n_train", "n_val", "n_test")))
        if self._cache_key != key:
            self._cache_key, self._cache = None, None  # free the old splits before making the new ones
            self._cache, self._cache_key = self.make_splits(point, seed), key
        return self._cache

    _cache_key: tuple | None = None
    _cache: Splits | None = None

    def run_cell(self, cell: Cell, make_attention: AttentionFactory, ctx: RunContext) -> dict:
        pt = dict(cell.point)
        check_trainable(get_impl(cell.method, cell.impl).capabilities, f"{cell.method}/{cell.impl}", causal=False)
        data = self.splits(pt, cell.seed)
        torch.manual_seed(cell.seed)  # the model's init
        cfg = ModelConfig(
            vocab=data.vocab, max_len=pt["seq_len"], d_model=pt["d_model"], n_layers=pt["n_layers"],
            n_heads=pt["n_heads"], mlp_ratio=pt["mlp_ratio"], positions=pt["positions"], causal=False,
            head="classify", n_classes=data.n_classes, pooling=pt["pooling"], pad_id=data.pad_id,
        )  # fmt: skip
        model = DualEncoderClassifier(cfg, make_attention) if self.pair_input else MixerModel(cfg, make_attention)
        train_cfg = TrainConfig(
            lr=pt["lr"], steps=pt["steps"], batch_size=pt["batch_size"], warmup_frac=pt["warmup_frac"],
            weight_decay=pt["weight_decay"], grad_clip=pt["grad_clip"], eval_every=pt["eval_every"],
            metric="accuracy", restore_best=True, time_budget_s=pt["time_budget_s"], seed=cell.seed,
            checkpoint_path=str(Path(ctx.checkpoint_dir) / f"{cell.cell_id}.pt") if ctx.checkpoint_dir else None,
        )  # fmt: skip
        result = Trainer(train_cfg, ctx.device).fit(model, data.train, data.validation)
        test_x, test_y = data.test
        test = evaluate(model, test_x, test_y, pt["batch_size"], ctx.device)
        return {
            "accuracy": test["accuracy"],
            "majority_rate": majority_rate(test_y),
            "val_accuracy": result.best["accuracy"],
            "test_loss": test["loss"],
            "train_seconds": result.train_seconds,
            "tokens_per_s": result.tokens_per_s,
            "steps_done": result.steps,
            "best_step": result.best_step,
            "stopped": result.stopped,
            "peak_mem_bytes": result.peak_mem_bytes,
            "peak_mem_note": result.peak_mem_note,
            "n_params": sum(p.numel() for p in model.parameters()),
            **forward_latency(model, test_x[: pt["batch_size"]], ctx),
        }

    def summary(self, ok: pd.DataFrame) -> list[SummaryColumn]:
        """Test accuracy at the largest preset measured (mean over seeds), and its forward latency for the Pareto."""
        if ok.empty:
            return []
        at = ok[ok["n_train"].eq(ok["n_train"].max())]
        where = f"preset {', '.join(sorted(at['preset'].astype(str).unique()))}, test split, mean over seeds"
        return quality_with_latency(self, at, "accuracy", where)

    def group_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        """LRA's table: methods x tasks + average (test accuracy, %), the published rows beside ours."""
        return [lra_table_section(rows)]


def lra_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, impl, preset) with each LRA task's mean test accuracy (%) and their average."""
    ok = rows[rows["status"].eq("ok") & rows["task"].isin(LRA_COLUMNS)]
    records = []
    for (method, impl, preset), group in ok.groupby(["method", "impl", "preset"], sort=True):
        record = {"method": f"{method}/{impl}", "preset": str(preset), "source": "this run"}
        scores = {}
        for task, column in LRA_COLUMNS.items():
            acc = group.loc[group["task"].eq(task), "accuracy"]
            scores[column] = 100 * float(acc.mean()) if not acc.empty else None
        record.update({c: "–" if v is None else f"{v:.2f}" for c, v in scores.items()})
        measured = [v for v in scores.values() if v is not None]
        record["Avg"] = f"{sum(measured) / len(measured):.2f}" + ("" if len(measured) == len(scores) else " (partial)")
        records.append(record)
    for name, source, scores, average in PUBLISHED:
        record = {"method": name, "preset": "published", "source": source}
        record.update({c: f"{v:.2f}" for c, v in zip(LRA_COLUMNS.values(), scores, strict=True)})
        record["Avg"] = f"{average:.2f}"
        records.append(record)
    return pd.DataFrame(records, columns=["method", "preset", *LRA_COLUMNS.values(), "Avg", "source"])


def lra_table_section(rows: pd.DataFrame) -> Section:
    text = ("Test accuracy (%) per LRA task, mean over seeds, the checkpoint chosen on the validation split; "
            "Avg over the tasks measured ('partial' when some are missing). Rows marked 'published' are the "
            "papers' numbers, not measured here.")  # fmt: skip
    return Section("Long Range Arena (test accuracy, %)", text, lra_table(rows))
