"""One trainer for every trained task: AdamW, warm-up + cosine, seeded, resumable, budgeted.

Every trained row must be reproducible from its seed and comparable across
methods, so the recipe is fixed here and only its hyper-parameters vary:

- **Data order** is a function of (seed, epoch): each epoch is a seeded
  permutation of the training set, so the data position is just the step, and
  a resumed run sees exactly the batches the uninterrupted one would.
- **Evaluation** (`evaluate`) reports accuracy, the mean cross-entropy per
  target (`loss`, nats) and `perplexity` = exp(loss) on the held-out set. The
  task names the metric (`TrainConfig.metric`) that picks the best evaluation
  and stops early at `TrainConfig.target`: MQAR selects on accuracy, a
  language model on perplexity. With `restore_best`, the model ends with the
  weights of the best evaluation (LRA's protocol: select on validation, then
  score the test set with that checkpoint).
- **Checkpoints** hold model, optimizer, scheduler, RNG state, step, data
  position, the evaluations so far (and the best weights with `restore_best`),
  written atomically (temp file + rename), so a kill at any moment leaves the
  previous checkpoint intact; `fit` resumes from one when it exists.
- **Stops**: the step budget, the target metric reached, or the wall-clock
  budget; `stopped` says which (target | budget | steps).
- **Cost columns**: training seconds, tokens/s, and peak memory: CUDA's peak
  allocated over the run, or on CPU the profiler's allocation trace around one
  training step (profiling the whole run would distort its time).

A model is anything with `labelled_logits(x, y) -> (logits (M, C), targets (M,))`
(`tasks.model.MixerModel`): the trainer's loss and evaluation read only those
M targets, whatever the head.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bench.measure.files import atomic_write
from bench.measure.memory import measure_peak_memory

STOPS = ("target", "budget", "steps")
# The evaluation's metrics and which direction is better: the metric a task selects on must be one of them.
EVAL_METRICS: dict[str, Literal["higher", "lower"]] = {"accuracy": "higher", "loss": "lower", "perplexity": "lower"}
CHECKPOINT_FORMAT = 2  # 2: evaluations are dicts of every eval metric; an older checkpoint is not resumed


@dataclass
class TrainConfig:
    lr: float = 1e-3
    steps: int = 1000  # total optimizer steps (a task converts epochs to steps)
    batch_size: int = 32
    warmup_frac: float = 0.1  # linear warm-up over this fraction of `steps`, then cosine to min_lr_frac * lr
    min_lr_frac: float = 0.0
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # nanoGPT decays every 2-D weight, embeddings included; our default spares them
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 100  # steps between held-out evaluations (and the last step)
    eval_batch_size: int = 256
    metric: str = "accuracy"  # the eval metric that picks the best evaluation (EVAL_METRICS)
    target: float | None = None  # early stop once `metric` reaches it (>= when higher is better, else <=)
    restore_best: bool = False  # end with the weights of the best evaluation instead of the last step's
    time_budget_s: float | None = None  # wall-clock budget for training + evaluation
    seed: int = 0
    checkpoint_path: str | None = None  # resume from it when it exists; write it every checkpoint_every steps
    checkpoint_every: int = 0  # 0: only at evaluations (when a path is set)
    progress: bool | None = None  # None: a tqdm bar on a TTY unless CI=true
    autocast: torch.dtype | None = None  # mixed precision for the training step's forward, on CUDA only (bf16)

    def __post_init__(self) -> None:
        if self.metric not in EVAL_METRICS:
            raise ValueError(f"unknown eval metric {self.metric!r}; choose from: {', '.join(EVAL_METRICS)}")
        if int(self.steps) < 0 or int(self.batch_size) < 1 or int(self.eval_every) < 1:
            raise ValueError(
                f"steps must be >= 0, batch_size and eval_every >= 1; got {self.steps}, {self.batch_size}, "
                f"{self.eval_every}"
            )


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken in total (including before a resume)
    stopped: str  # target | budget | steps
    metric: str  # the eval metric that chose `best`
    best: dict  # the best evaluation on `metric`: step, train_loss, lr, accuracy, loss, perplexity, seconds
    final: dict  # the last evaluation, same keys
    final_train_loss: float  # mean training loss over the last evaluation interval
    train_seconds: float  # wall time of this process's training loop, evaluation included
    tokens_per_s: float | None  # training tokens per second of step time (the profiled step excluded)
    peak_mem_bytes: int | None
    peak_mem_note: str
    history: list[dict] = field(default_factory=list)  # every evaluation, in order (seconds: training wall time so far)

    @property
    def best_step(self) -> int:
        return int(self.best["step"])

    def as_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, total: int, warmup: int, min_frac: float = 0.0) -> float:
    """Linear warm-up from ~0 to 1 over `warmup` steps, then cosine down to `min_frac`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


def show_progress(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true")


def atomic_save(obj: object, path: str | Path) -> None:
    """torch.save through a temp file and a rename: a kill never leaves half a checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training set's order in `epoch`: a function of (seed, epoch) only, so resuming needs just the step."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


class LabelledModel(Protocol):
    def labelled_logits(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def labelled_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch's targets (the model's `labelled_logits`)."""
    logits, targets = model.labelled_logits(x, y)
    return F.cross_entropy(logits, targets)


def perplexity(loss: float) -> float:
    """exp(mean loss per target); inf where exp overflows a float, NaN for a NaN loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device | str
) -> dict[str, float]:
    """Accuracy, loss and perplexity over every target of a held-out set (metric names of EVAL_METRICS).

    The loss is the mean cross-entropy per target over the whole set (summed
    over batches, then divided once), so it does not depend on the batch size;
    perplexity is its exp, the language-model convention.
    """
    was_training = model.training
    model.eval()
    hits, total, loss_sum = 0, 0, 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        logits, targets = model.labelled_logits(xb, yb)
        hits += int((logits.argmax(-1) == targets).sum())
        total += int(targets.numel())
        loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
    model.train(was_training)
    if not total:
        nan = float("nan")
        return {"accuracy": nan, "loss": nan, "perplexity": nan, "n_targets": 0}
    loss = loss_sum / total
    return {"accuracy": hits / total, "loss": loss, "perplexity": perplexity(loss), "n_targets": total}


def improves(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` of `metric` beats `best` (None: nothing yet). A NaN never improves."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if EVAL_METRICS[metric] == "higher" else value < best


def reached(metric: str, value: float, target: float | None) -> bool:
    """Whether `value` of `metric` meets the early-stop target."""
    if target is None or math.isnan(value):
        return False
    return value >= target if EVAL_METRICS[metric] == "higher" else value <= target


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights, so later steps cannot change the kept best."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Trainer:
    """`Trainer(cfg, device).fit(model, (x_train, y_train), (x_eval, y_eval))` -> TrainResult.

    The model must already be seeded and built; `fit` moves it to the device.
    `on_step(step, loss)` is called after each optimizer step, before that
    step's evaluation (tests use it to simulate an interruption).
    """

    def __init__(self, cfg: TrainConfig, device: torch.device | str = "cpu", loss_fn: LossFn = labelled_loss):
        self.cfg, self.device, self.loss_fn = cfg, torch.device(device), loss_fn
        self._order, self._order_epoch = torch.empty(0, dtype=torch.long), -1

    def _optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW with no weight decay on biases and norms, nor on embeddings unless `decay_embeddings`."""
        embeddings = set() if self.cfg.decay_embeddings else {
            id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas)
        warmup = max(1, int(self.cfg.warmup_frac * self.cfg.steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, self.cfg.steps, warmup, self.cfg.min_lr_frac)
        )
        return opt, sched

    def _save(self, path: Path, model: nn.Module, opt, sched, step: int, n_train: int, extra: dict) -> None:
        steps_per_epoch = max(1, n_train // self.cfg.batch_size)
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "step": step,
                "data": {"epoch": step // steps_per_epoch, "batch": step % steps_per_epoch},
                "extra": extra,
            },
            path,
        )

    def _load(self, path: Path, model: nn.Module, opt, sched) -> dict | None:
        """Restore a checkpoint into model, optimizer, scheduler and RNG; its `extra` with `step`, or None
        when it was written by an older trainer (then the run starts over: a checkpoint is only a cache)."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            warnings.warn(f"checkpoint {path} has format {state.get('format')}, not {CHECKPOINT_FORMAT}; "
                          "training from scratch", stacklevel=3)
            return None
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        return {**state["extra"], "step": state["step"]}

    def _batch(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at `step`: drop-last batches of the epoch's seeded permutation."""
        bs = self.cfg.batch_size
        steps_per_epoch = max(1, len(x) // bs)
        epoch, i = divmod(step, steps_per_epoch)
        if self._order_epoch != epoch:
            self._order, self._order_epoch = epoch_order(len(x), self.cfg.seed, epoch), epoch
        idx = self._order[i * bs : (i + 1) * bs]
        return x[idx].to(self.device, non_blocking=True), y[idx].to(self.device, non_blocking=True)

    def fit(
        self,
        model: nn.Module,
        train: tuple[torch.Tensor, torch.Tensor],
        held_out: tuple[torch.Tensor, torch.Tensor],
        on_step: Callable[[int, float], None] | None = None,
    ) -> TrainResult:
        """Train `model` on `train`, evaluating on `held_out` every `eval_every` steps and at the end."""
        cfg, device = self.cfg, self.device
        model.to(device).train()
        opt, sched = self._optimizer(model)
        self._order_epoch = -1
        step, history = 0, []
        best: dict | None = None
        best_state: dict[str, torch.Tensor] | None = None
        ckpt = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
        if ckpt is not None and ckpt.exists() and (resumed := self._load(ckpt, model, opt, sched)) is not None:
            step, best, history, best_state = resumed["step"], resumed["best"], resumed["history"], resumed["best_model"]

        def extra() -> dict:
            return {"best": best, "history": history, "best_model": best_state}

        peak, peak_note = None, ""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tokens_per_step = cfg.batch_size * train[0].shape[1]
        started = time.perf_counter()
        seconds_before = float(history[-1].get("seconds", 0.0)) if history else 0.0  # a resumed run's earlier time
        step_seconds, timed_steps, losses = 0.0, 0, []
        stopped = "steps"
        bar = None
        if show_progress(cfg.progress):
            from tqdm import tqdm  # only on a terminal: tqdm is a dev convenience, not a dependency of the rows

            bar = tqdm(total=cfg.steps, initial=step, desc="train", leave=False)

        use_autocast = cfg.autocast is not None and device.type == "cuda"

        def one_step(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=cfg.autocast, enabled=use_autocast):
                loss = self.loss_fn(model, xb, yb)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            return loss.detach()

        while step < cfg.steps:
            xb, yb = self._batch(*train, step)
            t0 = time.perf_counter()
            if peak is None and device.type == "cpu" and not peak_note:
                box = []
                peak = measure_peak_memory(lambda box=box, xb=xb, yb=yb: box.append(one_step(xb, yb)), device)
                loss, peak_note = box[0], "cpu profiler, one training step"
            else:
                loss = one_step(xb, yb)
                step_seconds += time.perf_counter() - t0
                timed_steps += 1
            step += 1
            loss_value = float(loss)
            losses.append(loss_value)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss is {loss_value} at step {step}")
            if bar is not None:
                bar.update(1)
                shown = f"{best[cfg.metric]:.3f}" if best is not None else "-"
                bar.set_postfix({"loss": f"{loss_value:.3f}", f"best {cfg.metric}": shown})
            if on_step is not None:
                on_step(step, loss_value)
            over_budget = cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s
            if step % cfg.eval_every == 0 or step == cfg.steps or over_budget:
                record = {"step": step, "train_loss": sum(losses) / len(losses), "lr": sched.get_last_lr()[0],
                          **evaluate(model, *held_out, cfg.eval_batch_size, device),
                          "seconds": seconds_before + time.perf_counter() - started}
                losses = []
                history.append(record)
                if improves(cfg.metric, record[cfg.metric], None if best is None else best[cfg.metric]):
                    best = record
                    if cfg.restore_best:
                        best_state = _snapshot(model)
                if ckpt is not None:
                    self._save(ckpt, model, opt, sched, step, len(train[0]), extra())
                if reached(cfg.metric, record[cfg.metric], cfg.target):
                    stopped = "target"
                    break
                if over_budget:
                    stopped = "budget"
                    break
            elif ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self._save(ckpt, model, opt, sched, step, len(train[0]), extra())
        if bar is not None:
            bar.close()

        if device.type == "cuda":
            peak, peak_note = int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated over the run"
        elif peak is None:
            peak_note = peak_note or "no training step ran in this process"
        if not history:  # zero steps: the untrained model's evaluation is all there is
            history.append({"step": step, "train_loss": float("nan"), "lr": sched.get_last_lr()[0],
                            **evaluate(model, *held_out, cfg.eval_batch_size, device)})
        if best is None:  # no step ran, or every evaluation was NaN: the last one stands
            best = history[-1]
        if cfg.restore_best and best_state is not None:
            model.load_state_dict(best_state)
        return TrainResult(
            steps=step,
            stopped=stopped,
            metric=cfg.metric,
            best=dict(best),
            final=dict(history[-1]),
            final_train_loss=history[-1]["train_loss"],
            train_seconds=time.perf_counter() - started,
            tokens_per_s=tokens_per_step * timed_steps / step_seconds if step_seconds > 0 else None,
            peak_mem_bytes=peak,
            peak_mem_note=peak_note,
            history=history,
        )
