"""One trainer for every trained task: AdamW, warm-up + cosine, seeded, resumable, budgeted.

Every trained row must be reproducible from its seed and comparable across
methods, so the recipe is fixed here and only its hyper-parameters vary:

- **Data order** is a function of (seed, epoch): each epoch is a seeded
  permutation of the training set, so the data position is just the step, and
  a resumed run sees exactly the batches the uninterrupted one would.
- **Checkpoints** hold model, optimizer, scheduler, RNG state, step and data
  position, written atomically (temp file + rename), so a kill at any moment
  leaves the previous checkpoint intact; `fit` resumes from one when it exists.
- **Stops**: the step budget, early stop once held-out accuracy reaches the
  target, or the wall-clock budget; `stopped` says which (target | budget | steps).
- **Cost columns**: training seconds, tokens/s, and peak memory: CUDA's peak
  allocated over the run, or on CPU the profiler's allocation trace around one
  training step (profiling the whole run would distort its time).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STOPS = ("target", "budget", "steps")


@dataclass
class TrainConfig:
    lr: float = 1e-3
    steps: int = 1000  # total optimizer steps (a task converts epochs to steps)
    batch_size: int = 32
    warmup_frac: float = 0.1  # linear warm-up over this fraction of `steps`, then cosine to min_lr_frac * lr
    min_lr_frac: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 100  # steps between held-out evaluations (and the last step)
    eval_batch_size: int = 256
    target_accuracy: float | None = None  # early stop once held-out accuracy >= target
    time_budget_s: float | None = None  # wall-clock budget for training + evaluation
    seed: int = 0
    checkpoint_path: str | None = None  # resume from it when it exists; write it every checkpoint_every steps
    checkpoint_every: int = 0  # 0: only at evaluations (when a path is set)
    progress: bool | None = None  # None: a tqdm bar on a TTY unless CI=true


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken in total (including before a resume)
    stopped: str  # target | budget | steps
    accuracy: float  # best held-out accuracy over the evaluations
    final_accuracy: float  # held-out accuracy at the last evaluation
    best_step: int
    final_loss: float  # mean training loss over the last evaluation interval
    train_seconds: float  # wall time of this process's training loop, evaluation included
    tokens_per_s: float | None  # training tokens per second of step time (the profiled step excluded)
    peak_mem_bytes: int | None
    peak_mem_note: str
    history: list[dict] = field(default_factory=list)  # one dict per evaluation: step, loss, accuracy, lr

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
    """torch.save to a temp file in the same folder, then rename: a kill never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training set's order in `epoch`: a function of (seed, epoch) only, so resuming needs just the step."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def labelled_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the labelled positions (label != -100); uses `labelled_logits` when the model has it."""
    if hasattr(model, "labelled_logits"):
        logits, targets = model.labelled_logits(x, y)
        return F.cross_entropy(logits, targets)
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Accuracy over the labelled positions (label != -100) of a held-out set."""
    was_training = model.training
    model.eval()
    hits = total = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        if hasattr(model, "labelled_logits"):
            logits, targets = model.labelled_logits(xb, yb)
        else:
            mask = yb != -100
            logits, targets = model(xb)[mask], yb[mask]
        hits += int((logits.argmax(-1) == targets).sum())
        total += int(targets.numel())
    model.train(was_training)
    return hits / total if total else float("nan")


class Trainer:
    """`Trainer(cfg, device).fit(model, (x_train, y_train), (x_test, y_test))` -> TrainResult.

    The model must already be seeded and built; `fit` moves it to the device.
    `on_step(step, loss)` is called after each optimizer step (tests use it to
    simulate an interruption).
    """

    def __init__(self, cfg: TrainConfig, device: torch.device | str = "cpu", loss_fn: LossFn = labelled_loss):
        self.cfg, self.device, self.loss_fn = cfg, torch.device(device), loss_fn

    def _optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW with no weight decay on biases, norms and embeddings (nanoGPT's split)."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and "tok" not in name and "pos" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas)
        warmup = max(1, int(self.cfg.warmup_frac * self.cfg.steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, self.cfg.steps, warmup, self.cfg.min_lr_frac)
        )
        return opt, sched

    def _save(self, path, model, opt, sched, step, n_train, extra) -> None:
        steps_per_epoch = max(1, n_train // self.cfg.batch_size)
        atomic_save(
            {
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

    def _batch(self, x, y, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at `step`: drop-last batches of the epoch's seeded permutation."""
        bs = self.cfg.batch_size
        steps_per_epoch = max(1, len(x) // bs)
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 or self._order_epoch != epoch:
            self._order, self._order_epoch = epoch_order(len(x), self.cfg.seed, epoch), epoch
        idx = self._order[i * bs : (i + 1) * bs]
        return x[idx].to(self.device, non_blocking=True), y[idx].to(self.device, non_blocking=True)

    def fit(self, model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
            on_step: Callable[[int, float], None] | None = None) -> TrainResult:
        cfg, device = self.cfg, self.device
        model.to(device).train()
        opt, sched = self._optimizer(model)
        self._order_epoch = -1
        step, best, best_step, history = 0, -1.0, 0, []
        ckpt = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
        if ckpt is not None and ckpt.exists():
            state = torch.load(ckpt, map_location=device, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng_cpu"])
            if state["rng_cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            step = state["step"]
            best, best_step, history = state["extra"]["best"], state["extra"]["best_step"], state["extra"]["history"]

        peak, peak_note = None, ""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tokens_per_step = cfg.batch_size * train[0].shape[1]
        started = time.perf_counter()
        step_seconds, timed_steps, losses = 0.0, 0, []
        stopped, acc = "steps", history[-1]["accuracy"] if history else float("nan")
        bar = None
        if show_progress(cfg.progress):
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=step, desc="train", leave=False)

        def one_step(xb, yb) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
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
                from bench.memory import measure_peak_memory

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
                bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{acc:.3f}")
            if on_step is not None:
                on_step(step, loss_value)
            over_budget = cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s
            if step % cfg.eval_every == 0 or step == cfg.steps or over_budget:
                acc = evaluate(model, *test, cfg.eval_batch_size, device)
                interval_loss = sum(losses) / len(losses)
                losses = []
                history.append({"step": step, "loss": interval_loss, "accuracy": acc, "lr": sched.get_last_lr()[0]})
                if acc > best:
                    best, best_step = acc, step
                if ckpt is not None:
                    self._save(ckpt, model, opt, sched, step, len(train[0]),
                               {"best": best, "best_step": best_step, "history": history})
                if cfg.target_accuracy is not None and acc >= cfg.target_accuracy:
                    stopped = "target"
                    break
                if over_budget:
                    stopped = "budget"
                    break
            elif ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                self._save(ckpt, model, opt, sched, step, len(train[0]),
                           {"best": best, "best_step": best_step, "history": history})
        if bar is not None:
            bar.close()

        if device.type == "cuda":
            peak, peak_note = int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated over the run"
        elif peak is None:
            peak_note = peak_note or "no training step ran in this process"
        if not history:  # resumed from a finished checkpoint, or zero steps
            acc = evaluate(model, *test, cfg.eval_batch_size, device)
            history.append({"step": step, "loss": float("nan"), "accuracy": acc, "lr": sched.get_last_lr()[0]})
            best, best_step = acc, step
        return TrainResult(
            steps=step,
            stopped=stopped,
            accuracy=best,
            final_accuracy=history[-1]["accuracy"],
            best_step=best_step,
            final_loss=history[-1]["loss"],
            train_seconds=time.perf_counter() - started,
            tokens_per_s=tokens_per_step * timed_steps / step_seconds if step_seconds > 0 else None,
            peak_mem_bytes=peak,
            peak_mem_note=peak_note,
            history=history,
        )
