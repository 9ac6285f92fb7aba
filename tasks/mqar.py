"""Task `mqar`: multi-query associative recall (Zoology, Arora et al. 2023), trained from scratch.

Associative recall explains most of the quality gap between attention and its
efficient replacements (Zoology: 82% of the perplexity gap), and recall
against recurrent-state size is Based's headline trade-off. So each cell
trains the small model of `tasks/model.py` with the cell's method as mixer and
reports held-out recall accuracy, with the mixer's state size at seq_len.

The data (written from Zoology's description, not its code). Vocabulary V:
keys in [1, V/2), values in [V/2, V), token 0 is filler when `filler=zero`.

    k1 v1 k2 v2 ... kP vP | . . q . . . q . ...      (seq_len tokens)

- The first 2P tokens are the P key-value pairs (keys distinct, values distinct).
- The rest is (seq_len - 2P) / 2 two-token slots. Each key is queried once, in
  a slot drawn without replacement with probability proportional to i^(a-1)
  (i = 1, 2, ... the slot index, a = 0.01: queries cluster near the pairs, with
  a long tail). The query token is the slot's first token.
- Labels are next-token targets: the label at a query's position is its value;
  every other label is -100. Accuracy counts the labelled positions only.
- The other tokens are filler: random tokens of the whole vocabulary
  (`filler=random`, Zoology's `random_non_queries`) or 0 (`filler=zero`).

Chance: a model that cannot see the pairs can only guess among the V - V/2
values, so chance is 1 / (V - V/2) (column `chance`).

Train and test sets come from disjoint seeds, derived from the run seed.
The learning rate may be a list in the config: each lr is its own cell, and
the report (`tasks/mqar_views.py`) keeps the best per (method, d_model,
seq_len, kv pairs), as Zoology sweeps and reports the best lr.

The task's defaults (the `smoke` preset) live in `conf/task/mqar.yaml` only;
`normalise_point` validates a point and derives the shape columns every row
has, it never fills a default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from methods import get_impl
from tasks.base import AttentionFactory, Cell, Metric, RunContext, Section, SummaryColumn, Task
from tasks.model import POSITIONS, MixerModel, ModelConfig, check_trainable
from tasks.mqar_views import mqar_table, ok_rows, recall_vs_state_plots
from tasks.registry import register_task
from tasks.trainer import TrainConfig, Trainer

FILLERS = ("random", "zero")
TRAIN_SEED_SALT, TEST_SEED_SALT = 1, 2  # train and test never share a generator seed


@dataclass
class MQARData:
    inputs: torch.Tensor  # (n, seq_len) int64
    labels: torch.Tensor  # (n, seq_len) int64, -100 except at query positions


def check_mqar_args(seq_len: int, vocab: int, num_kv_pairs: int) -> None:
    """The generator's preconditions, as Zoology asserts them, with messages that say what to change."""
    if seq_len % 2:
        raise ValueError(f"MQAR seq_len must be even (two-token query slots), got {seq_len}")
    if vocab <= seq_len:
        raise ValueError(f"MQAR vocab must be larger than seq_len ({vocab} <= {seq_len})")
    if num_kv_pairs < 1 or 4 * num_kv_pairs > seq_len:
        raise ValueError(f"MQAR needs 1 <= 4 * num_kv_pairs <= seq_len, got num_kv_pairs={num_kv_pairs}, seq_len={seq_len}")


def query_slot_probs(slots: int, power_a: float = 0.01) -> torch.Tensor:
    """P(slot i) proportional to i^(a-1), i = 1..slots: a power law that favours slots near the pairs."""
    p = torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    return p / p.sum()


def _distinct(n: int, pool: int, k: int, gen: torch.Generator, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """(n, k) distinct draws from range(pool) per row, in row chunks so that V=8192 x 100k rows fits in memory."""
    rows = max(1, chunk_elems // pool)
    return torch.cat([torch.rand(min(rows, n - i), pool, generator=gen).topk(k, dim=-1).indices
                      for i in range(0, n, rows)])


def make_mqar(n: int, seq_len: int, vocab: int, num_kv_pairs: int, seed: int,
              power_a: float = 0.01, filler: str = "random") -> MQARData:
    """`n` MQAR sequences (module docstring), a pure function of its arguments."""
    check_mqar_args(seq_len, vocab, num_kv_pairs)
    if filler not in FILLERS:
        raise ValueError(f"unknown filler {filler!r}; choose from: {', '.join(FILLERS)}")
    gen = torch.Generator().manual_seed(seed)
    p, half = num_kv_pairs, vocab // 2
    keys = _distinct(n, half - 1, p, gen) + 1  # distinct, in [1, V/2)
    values = _distinct(n, vocab - half, p, gen) + half  # distinct, in [V/2, V)
    slots = (seq_len - 2 * p) // 2
    probs = query_slot_probs(slots, power_a).expand(n, slots)
    slot = torch.multinomial(probs, p, replacement=False, generator=gen)  # (n, p): key j is queried in slot[:, j]
    query_pos = 2 * p + 2 * slot

    if filler == "random":
        inputs = torch.randint(0, vocab, (n, seq_len), generator=gen)
    else:
        inputs = torch.zeros(n, seq_len, dtype=torch.long)
    inputs[:, 0 : 2 * p : 2], inputs[:, 1 : 2 * p : 2] = keys, values
    inputs.scatter_(1, query_pos, keys)
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    labels.scatter_(1, query_pos, values)
    return MQARData(inputs, labels)


def split_seed(seed: int, salt: int) -> int:
    return seed * 7919 + salt


def chance_accuracy(vocab: int) -> float:
    return 1.0 / (vocab - vocab // 2)


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of an MQAR point: its type, what it accepts (said in the error), and the check."""

    kind: type  # int | float | str
    accepts: str
    ok: Callable[[object], bool] = lambda value: True
    optional: bool = False  # None (the YAML's null) is allowed


def _int(minimum: int, extra: str = "") -> Param:
    return Param(int, f"an integer >= {minimum}{extra}", lambda v: v >= minimum)


def _choice(choices: tuple[str, ...]) -> Param:
    return Param(str, f"one of: {', '.join(choices)}", lambda v: v in choices)


# Every hyper-parameter of conf/task/mqar.yaml (dtype aside): its sweep keys, and how each is validated.
PARAMS: dict[str, Param] = {
    "vocab": Param(int, "an integer > seq_len", lambda v: v >= 2),
    "seq_len": Param(int, "an even integer >= 4", lambda v: v >= 4 and v % 2 == 0),
    "num_kv_pairs": _int(1, " with 4 * num_kv_pairs <= seq_len"),
    "train_size": _int(1),
    "test_size": _int(1),
    "power_a": Param(float, "a number >= 0", lambda v: v >= 0),
    "filler": _choice(FILLERS),
    "d_model": _int(1, ", divisible by n_heads"),
    "n_layers": _int(1),
    "n_heads": _int(1),
    "mlp_ratio": _int(0),
    "positions": _choice(POSITIONS),
    "conv_kernel": _int(0),
    "lr": Param(float, "a number > 0", lambda v: v > 0),
    "epochs": _int(1),
    "steps": Param(int, "null or an integer >= 1", lambda v: v >= 1, optional=True),
    "batch_size": _int(1),
    "warmup_frac": Param(float, "a number in [0, 1]", lambda v: 0 <= v <= 1),
    "weight_decay": Param(float, "a number >= 0", lambda v: v >= 0),
    "grad_clip": Param(float, "a number >= 0 (0: no clipping)", lambda v: v >= 0),
    "eval_every": _int(1),
    "target_accuracy": Param(float, "null or a number in [0, 1]", lambda v: 0 <= v <= 1, optional=True),
    "time_budget_s": Param(float, "null or a number > 0", lambda v: v > 0, optional=True),
}


def read_param(name: str, value: object) -> object:
    """The value as its declared type (2 -> 2.0 for a float key, so equal points are one cell), or a
    one-line ValueError naming the key and what it accepts."""
    param = PARAMS[name]
    bad = ValueError(f"mqar: {name} must be {param.accepts}; got {value!r}")
    if value is None:
        if param.optional:
            return None
        raise bad
    if param.kind is str:
        parsed = value if isinstance(value, str) else None
    elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        parsed = None
    elif param.kind is int:
        parsed = int(value) if float(value).is_integer() else None
    else:
        parsed = float(value)
    if parsed is None or not param.ok(parsed):
        raise bad
    return parsed


def total_steps(point: Mapping) -> int:
    """`steps` when set, else `epochs` passes over the drop-last batches of the training set."""
    if point.get("steps"):
        return int(point["steps"])
    return max(1, int(point["epochs"]) * max(1, int(point["train_size"]) // int(point["batch_size"])))


@register_task
class MQARTask(Task):
    name = "mqar"
    trains = True
    description = "multi-query associative recall accuracy of a small trained model (Zoology); recall vs state size"
    keys = tuple(k for k in PARAMS if k != "seq_len")  # seq_len is a shape key
    metrics = (
        Metric("accuracy", "fraction", "higher", "drop", "recall accuracy"),
        Metric("final_accuracy", "fraction", "higher", None, "accuracy at the last evaluation"),
        Metric("chance", "fraction", None, None, "chance"),
        Metric("eval_loss", "nats", "lower", None, "held-out loss at the best evaluation"),
        Metric("eval_perplexity", "", "lower", None, "held-out perplexity at the best evaluation"),
        Metric("final_loss", "nats", "lower", None, "training loss (last interval)"),
        Metric("train_seconds", "s", "lower", None, "training time"),
        Metric("tokens_per_s", "tokens/s", "higher", None, "training throughput"),
        Metric("peak_mem_bytes", "bytes", "lower", None, "peak memory (training)"),
        Metric("state_bytes", "bytes", "lower", None, "decode state at seq_len (all layers)"),
        Metric("n_params", "", None, None, "parameters"),
        Metric("best_step", "steps", None, None, "step of the best evaluation"),
        Metric("steps_done", "steps", None, None, "steps trained"),
        Metric("total_steps", "steps", None, None, "step budget"),
    )
    headline = "accuracy"
    pareto = ("train_seconds", "accuracy")

    def normalise_point(self, point: dict) -> dict | None:
        """Validate every hyper-parameter and derive the shape columns (heads, head_dim, batch, kv_len, causal,
        mode). Defaults are not filled here: they live in conf/task/mqar.yaml, and the runner passes them in."""
        point = dict(point)
        missing = [k for k in PARAMS if k not in point]
        if missing:
            raise ValueError(f"mqar: the point lacks {', '.join(missing)} (defaults: conf/task/mqar.yaml)")
        for name in PARAMS:
            point[name] = read_param(name, point[name])
        if point["vocab"] <= point["seq_len"]:
            raise ValueError(f"mqar: vocab must be an integer > seq_len ({point['seq_len']}); got {point['vocab']}")
        if 4 * point["num_kv_pairs"] > point["seq_len"]:
            raise ValueError(f"mqar: num_kv_pairs must be {PARAMS['num_kv_pairs'].accepts} "
                             f"({point['seq_len']}); got {point['num_kv_pairs']}")
        if point["d_model"] % point["n_heads"]:
            raise ValueError(f"mqar: d_model must be {PARAMS['d_model'].accepts} ({point['n_heads']}); "
                             f"got {point['d_model']}")
        derived = {
            "dtype": ("float32", "the model trains in float32"),
            "causal": (True, "recall is next-token prediction"),
            "mode": ("train", "the cell trains a model"),
            "heads": (point["n_heads"], "it follows n_heads"),
            "head_dim": (point["d_model"] // point["n_heads"], "it is d_model / n_heads"),
            "batch": (point["batch_size"], "it follows batch_size"),
            "kv_len": (point["seq_len"], "it follows seq_len"),
        }
        for key, (value, why) in derived.items():
            if point.get(key) is not None and point[key] != value:
                raise ValueError(f"mqar: {key} must be {value!r} ({why}); got {point[key]!r}")
            point[key] = value
        return point

    def run_cell(self, cell: Cell, make_attention: AttentionFactory, ctx: RunContext) -> dict:
        pt = self.normalise_point(dict(cell.point))  # idempotent: a hand-made cell is checked like a planned one
        check_trainable(get_impl(cell.method, cell.impl).capabilities, f"{cell.method}/{cell.impl}", causal=True)
        gen_args = dict(seq_len=pt["seq_len"], vocab=pt["vocab"], num_kv_pairs=pt["num_kv_pairs"],
                        power_a=pt["power_a"], filler=pt["filler"])
        train = make_mqar(pt["train_size"], seed=split_seed(cell.seed, TRAIN_SEED_SALT), **gen_args)
        test = make_mqar(pt["test_size"], seed=split_seed(cell.seed, TEST_SEED_SALT), **gen_args)

        torch.manual_seed(cell.seed)  # the model's init
        model_cfg = ModelConfig(
            vocab=pt["vocab"], max_len=pt["seq_len"], d_model=pt["d_model"], n_layers=pt["n_layers"],
            n_heads=pt["n_heads"], mlp_ratio=pt["mlp_ratio"], positions=pt["positions"],
            conv_kernel=pt["conv_kernel"], causal=True, head="lm",
        )
        model = MixerModel(model_cfg, make_attention)
        steps = total_steps(pt)
        train_cfg = TrainConfig(
            lr=pt["lr"], steps=steps, batch_size=pt["batch_size"], warmup_frac=pt["warmup_frac"],
            weight_decay=pt["weight_decay"], grad_clip=pt["grad_clip"], eval_every=pt["eval_every"],
            metric="accuracy", target=pt["target_accuracy"], time_budget_s=pt["time_budget_s"], seed=cell.seed,
            checkpoint_path=str(Path(ctx.checkpoint_dir) / f"{cell.cell_id}.pt") if ctx.checkpoint_dir else None,
        )
        result = Trainer(train_cfg, ctx.device).fit(model, (train.inputs, train.labels), (test.inputs, test.labels))
        return {
            "accuracy": result.best["accuracy"],
            "final_accuracy": result.final["accuracy"],
            "chance": chance_accuracy(pt["vocab"]),
            "eval_loss": result.best["loss"],
            "eval_perplexity": result.best["perplexity"],
            "final_loss": result.final_train_loss,
            "train_seconds": result.train_seconds,
            "tokens_per_s": result.tokens_per_s,
            "best_step": result.best_step,
            "steps_done": result.steps,
            "total_steps": steps,
            "stopped": result.stopped,
            "peak_mem_bytes": result.peak_mem_bytes,
            "peak_mem_note": result.peak_mem_note,
            "state_bytes": model.state_bytes(pt["seq_len"]),
            "n_params": sum(p.numel() for p in model.parameters()),
            "eval_history": [h["accuracy"] for h in result.history],
            "eval_steps": [h["step"] for h in result.history],
        }

    def summary(self, ok: pd.DataFrame) -> list[SummaryColumn]:
        """Best accuracy over the lrs per (method, impl) at the largest (seq_len, kv pairs, d_model) measured,
        and that run's training time (the Pareto plot's cost axis, not a table column)."""
        rows = ok_rows(ok)
        if rows.empty:
            return []
        size = ["seq_len", "num_kv_pairs", "d_model"]
        sizes = rows[size].apply(pd.to_numeric).astype(int)
        largest = max(sizes.itertuples(index=False, name=None))
        at = rows[(sizes == pd.Series(largest, index=size)).all(axis=1)]
        at = at.assign(accuracy=pd.to_numeric(at["accuracy"]))
        best = at.loc[at.groupby(["method", "impl"])["accuracy"].idxmax()].set_index(["method", "impl"])
        where = f"N={largest[0]}, {largest[1]} kv pairs, d_model={largest[2]}, best lr"
        columns = [SummaryColumn(self.metric("accuracy"), where, best["accuracy"])]
        if "train_seconds" in best.columns:
            seconds = pd.to_numeric(best["train_seconds"], errors="coerce")
            columns.append(SummaryColumn(self.metric("train_seconds"), where, seconds, in_table=False))
        return columns

    def report_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        """The best-lr table per model size and the recall-vs-state plots (Based, Figure 2)."""
        table = mqar_table(rows)
        if table.empty:
            return []
        text = (
            "Held-out recall accuracy at the best learning rate swept, per model size; the spread is the accuracy "
            "range over those learning rates (a method that needs one exact lr is fragile). State: the decoder "
            "state of all layers at seq_len, the x axis of the recall-vs-state plots."
        )
        return [Section("MQAR (best learning rate per size)", text, table, recall_vs_state_plots(rows, out_dir))]
