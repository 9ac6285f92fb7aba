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
`bench.mqar_report` keeps the best per (method, d_model, seq_len), as Zoology
sweeps and reports the best lr.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from methods import get_impl
from methods.base import Attention, Unsupported
from tasks.base import Cell, RunContext, Task
from tasks.model import ModelConfig, TinyLM
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


POINT_DEFAULTS = dict(
    vocab=128, seq_len=64, num_kv_pairs=4, train_size=4000, test_size=500, power_a=0.01, filler="random",
    d_model=64, n_layers=2, n_heads=1, mlp_ratio=0, positions="learned", conv_kernel=0,
    lr=1e-3, epochs=8, steps=None, batch_size=32, warmup_frac=0.1, weight_decay=0.1, grad_clip=1.0,
    eval_every=50, target_accuracy=0.99, time_budget_s=None, dtype="float32",
)


class MQARTask(Task):
    name = "mqar"
    description = "multi-query associative recall accuracy of a small trained model (Zoology); recall vs state size"
    trained = True

    def normalise_point(self, point: dict) -> dict | None:
        """Fill the defaults and the shape columns every row has (heads, head_dim, batch, kv_len, causal, mode)."""
        point = {**POINT_DEFAULTS, **point}
        if point["dtype"] != "float32":
            raise ValueError(f"mqar trains in float32 only, got dtype {point['dtype']!r}")
        point["lr"] = float(point["lr"])
        point.update(
            heads=point["n_heads"], head_dim=point["d_model"] // point["n_heads"], batch=point["batch_size"],
            kv_len=point["seq_len"], causal=True, mode="train",
        )
        return point

    def total_steps(self, point: dict) -> int:
        if point.get("steps"):
            return int(point["steps"])
        return max(1, int(point["epochs"]) * (int(point["train_size"]) // int(point["batch_size"])))

    def run_cell(self, cell: Cell, attn: Attention, ctx: RunContext) -> dict:
        pt = self.normalise_point(dict(cell.point))
        spec = get_impl(cell.method, cell.impl)
        if not spec.capabilities.backward:  # before any data or model is made
            raise Unsupported(f"{cell.method}/{cell.impl} has no backward, so it cannot be trained"
                              + (f" ({spec.capabilities.note})" if spec.capabilities.note else ""))
        gen_args = dict(seq_len=pt["seq_len"], vocab=pt["vocab"], num_kv_pairs=pt["num_kv_pairs"],
                        power_a=pt["power_a"], filler=pt["filler"])
        train = make_mqar(pt["train_size"], seed=split_seed(cell.seed, TRAIN_SEED_SALT), **gen_args)
        test = make_mqar(pt["test_size"], seed=split_seed(cell.seed, TEST_SEED_SALT), **gen_args)

        torch.manual_seed(cell.seed)  # the model's init
        model_cfg = ModelConfig(
            vocab=pt["vocab"], max_len=pt["seq_len"], d_model=pt["d_model"], n_layers=pt["n_layers"],
            n_heads=pt["n_heads"], mlp_ratio=pt["mlp_ratio"], positions=pt["positions"],
            conv_kernel=pt["conv_kernel"], method=cell.method, impl=cell.impl, method_params=dict(cell.method_params),
        )
        model = TinyLM(model_cfg)
        steps = self.total_steps(pt)
        ckpt_dir = getattr(ctx, "checkpoint_dir", None) or os.environ.get("ATTNBENCH_CHECKPOINT_DIR")
        train_cfg = TrainConfig(
            lr=pt["lr"], steps=steps, batch_size=pt["batch_size"], warmup_frac=pt["warmup_frac"],
            weight_decay=pt["weight_decay"], grad_clip=pt["grad_clip"], eval_every=pt["eval_every"],
            target_accuracy=pt["target_accuracy"], time_budget_s=pt["time_budget_s"], seed=cell.seed,
            checkpoint_path=str(Path(ckpt_dir) / f"{cell.cell_id}.pt") if ckpt_dir else None,
        )
        result = Trainer(train_cfg, ctx.device).fit(model, (train.inputs, train.labels), (test.inputs, test.labels))
        n_params = sum(p.numel() for p in model.parameters())
        return {
            "accuracy": result.accuracy,
            "final_accuracy": result.final_accuracy,
            "chance": chance_accuracy(pt["vocab"]),
            "train_seconds": result.train_seconds,
            "tokens_per_s": result.tokens_per_s,
            "final_loss": result.final_loss,
            "best_step": result.best_step,
            "steps_done": result.steps,
            "total_steps": steps,
            "stopped": result.stopped,
            "peak_mem_bytes": result.peak_mem_bytes,
            "peak_mem_note": result.peak_mem_note,
            "state_bytes": model.state_bytes(pt["seq_len"]),
            "n_params": n_params,
            "eval_history": [h["accuracy"] for h in result.history],
            "eval_steps": [h["step"] for h in result.history],
            "log10_lr": math.log10(pt["lr"]),
        }
