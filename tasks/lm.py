"""Task `lm`: train the same small GPT with each method as its mixer, and report validation perplexity.

The protocol of the GLA, DeltaNet and Based papers: one decoder-only model
recipe, one corpus, one step budget and one seed for every method, so the
quality difference between two rows is the mixer's. The recipe is nanoGPT's
(learned positions, pre-norm LayerNorm, GELU MLP x4, dropout, tied
embeddings, no biases, GPT-2 init, AdamW with betas (0.9, beta2) and decay on
every 2-D weight, linear warm-up + cosine decay to `min_lr`, gradient
clipping), so a `softmax` row at preset `shakespeare_char_cpu` can be set
beside nanoGPT's own number (validation loss about 1.88). A method that
needs its own positions or norms (cosFormer's re-weighting, DeltaNet's
normalised keys) keeps them inside the method.

Data and evaluation (`tasks/lm_data.py`): every training window of the
training split is one example, in a seeded permutation per epoch (nanoGPT
samples random offsets; this is the same distribution without
replacement). During training the loss is estimated every `eval_every` steps
on `eval_batches` x `batch_size` fixed random validation windows (nanoGPT's
`estimate_loss`); the row's `val_loss` is the whole validation split (or its
first `eval_tokens` tokens) in non-overlapping windows, every token scored
once. `bits_per_char` converts it with the split's tokens per character, so
char, byte and BPE models compare.

The trained weights go to `<cache_dir>/lm_models/<key>.pt` (key: a hash of the
model, training, data and method), where `lm_swap` finds the softmax model
it swaps methods into.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import torch

from methods import get_impl, validate_params
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
from tasks.lm_data import LMCorpus, bits_per_char, load_corpus, windows
from tasks.model import MixerModel, ModelConfig, check_trainable, forward_latency
from tasks.presets import check_ints, resolve_preset
from tasks.registry import register_task
from tasks.trainer import TrainConfig, Trainer, TrainResult, atomic_save, evaluate

# The keys of a trained language model: data, model, optimisation. `lm_swap` reads the same keys.
DATA_KEYS = ("source", "data_files", "data_dir", "tokenizer", "bpe_vocab")
MODEL_KEYS = ("context", "n_layers", "n_heads", "d_model", "dropout", "bias", "tie_embeddings")
TRAIN_KEYS = ("lr", "min_lr", "warmup_steps", "steps", "batch_size", "weight_decay", "beta2", "grad_clip",
              "eval_every", "eval_batches", "autocast", "time_budget_s")  # fmt: skip
LM_KEYS = ("preset", *DATA_KEYS, *MODEL_KEYS, *TRAIN_KEYS, "eval_tokens")
INT_KEYS = ("bpe_vocab", "context", "n_layers", "n_heads", "d_model", "steps", "batch_size", "eval_every",
            "eval_batches")  # fmt: skip
AUTOCASTS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
EVAL_SALT = 104_729  # the fixed validation windows of the training-time estimate are drawn from seed + this

# The quality columns of both perplexity tasks (`lm_swap` reuses them).
VAL_LOSS = Metric("val_loss", "nats/token", "lower", "growth", "validation loss")
PERPLEXITY = Metric("perplexity", "", "lower", None, "perplexity per token")
BITS_PER_CHAR = Metric("bits_per_char", "bits", "lower", None, "bits per character")


def check_lm_point(task: str, point: dict) -> dict:
    """Validate the resolved keys of a language model (one-line errors) and type the floats."""
    check_ints(task, point, [k for k in INT_KEYS if k != "bpe_vocab" or point["tokenizer"] == "bpe"])
    for key in ("lr", "min_lr", "weight_decay", "beta2", "grad_clip", "dropout"):
        point[key] = float(point[key])
    if not point["lr"] > 0 or not 0 <= point["min_lr"] <= point["lr"]:
        raise ValueError(f"{task}: need lr > 0 and 0 <= min_lr <= lr, got lr={point['lr']}, min_lr={point['min_lr']}")
    if not 0 <= point["warmup_steps"] <= point["steps"]:
        raise ValueError(f"{task}: warmup_steps must be in [0, steps], got {point['warmup_steps']}")
    if point["d_model"] % point["n_heads"]:
        raise ValueError(f"{task}: d_model ({point['d_model']}) must be divisible by n_heads ({point['n_heads']})")
    if point["autocast"] not in AUTOCASTS:
        raise ValueError(f"{task}: unknown autocast {point['autocast']!r}; choose from: null, bf16, fp16")
    if point["eval_tokens"] is not None and (isinstance(point["eval_tokens"], bool) or int(point["eval_tokens"]) <= point["context"]):
        raise ValueError(f"{task}: eval_tokens must be null or an int > context, got {point['eval_tokens']!r}")
    return point


def corpus_for(point: Mapping) -> LMCorpus:
    files = point.get("data_files")
    if isinstance(files, Mapping):
        files = tuple(sorted((k, v if isinstance(v, str) else tuple(v)) for k, v in files.items()))
    elif isinstance(files, list):
        files = tuple(files)
    return load_corpus(point["source"], point["tokenizer"], data_files=files, data_dir=point.get("data_dir"),
                       bpe_vocab=int(point["bpe_vocab"] or 1024))  # fmt: skip


def model_config(point: Mapping, vocab: int) -> ModelConfig:
    """nanoGPT's GPT as a `MixerModel`: MLP x4, learned positions, causal, LM head, GPT-2 init."""
    return ModelConfig(
        vocab=vocab, max_len=point["context"], d_model=point["d_model"], n_layers=point["n_layers"],
        n_heads=point["n_heads"], mlp_ratio=4, positions="learned", causal=True, head="lm",
        dropout=point["dropout"], bias=bool(point["bias"]), tie_embeddings=bool(point["tie_embeddings"]), init="gpt2",
    )  # fmt: skip


def train_config(point: Mapping, seed: int, checkpoint_path: str | None = None) -> TrainConfig:
    """nanoGPT's optimisation: AdamW (0.9, beta2), decay on every 2-D weight, warm-up + cosine to min_lr."""
    return TrainConfig(
        lr=point["lr"], steps=point["steps"], batch_size=point["batch_size"],
        warmup_frac=point["warmup_steps"] / max(1, point["steps"]), min_lr_frac=point["min_lr"] / point["lr"],
        weight_decay=point["weight_decay"], decay_embeddings=True, betas=(0.9, point["beta2"]),
        grad_clip=point["grad_clip"], eval_every=point["eval_every"], eval_batch_size=max(point["batch_size"], 64),
        metric="loss", time_budget_s=point["time_budget_s"], seed=seed, checkpoint_path=checkpoint_path,
        autocast=AUTOCASTS[point["autocast"]],
    )  # fmt: skip


def estimate_windows(ids: torch.Tensor, context: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` validation windows at seeded random offsets (nanoGPT's `estimate_loss`), the same for every method."""
    x, y = windows(ids, context)
    pick = torch.randint(len(x), (n,), generator=torch.Generator().manual_seed(seed + EVAL_SALT))
    return x[pick], y[pick]


def full_validation(model: torch.nn.Module, corpus: LMCorpus, context: int, eval_tokens: int | None,
                    batch_size: int, device: torch.device | str) -> dict[str, float]:
    """Loss, perplexity and bits/char over the validation split (first `eval_tokens` tokens), every token once."""
    ids = corpus.validation if eval_tokens is None else corpus.validation[: int(eval_tokens) + 1]
    x, y = windows(ids, context, stride=context)
    result = evaluate(model, x, y, batch_size, device)
    loss = result["loss"]
    return {"val_loss": loss, "perplexity": result["perplexity"], "val_tokens": result["n_targets"],
            "bits_per_char": bits_per_char(loss, corpus.tokens_per_char("validation"))}  # fmt: skip


def model_key(point: Mapping, seed: int, method: str, impl: str, params: Mapping, corpus: LMCorpus) -> str:
    """What makes a trained model this model: keys, seed, method, its parameters, and the data itself."""
    keys = {k: point[k] for k in (*MODEL_KEYS, *TRAIN_KEYS, "tokenizer", "bpe_vocab") if k != "time_budget_s"}
    blob = {"keys": keys, "seed": seed, "method": method, "impl": impl, "params": dict(params),
            "data": corpus.fingerprint}  # fmt: skip
    return hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_path(cache_dir: Path | str, key: str) -> Path:
    return Path(cache_dir) / "lm_models" / f"{key}.pt"


def train_lm(point: Mapping, seed: int, make_attention: AttentionFactory, device: torch.device | str,
             checkpoint_path: str | None = None,
             on_step: Callable[[int, float], None] | None = None) -> tuple[MixerModel, TrainResult, LMCorpus]:
    """Build and train the point's model with `make_attention` as mixer; resumes from `checkpoint_path`."""
    corpus = corpus_for(point)
    x, y = windows(corpus.train, point["context"])
    held_out = estimate_windows(corpus.validation, point["context"], point["eval_batches"] * point["batch_size"], seed)
    torch.manual_seed(seed)  # the model's init
    model = MixerModel(model_config(point, corpus.tokenizer.vocab_size), make_attention)
    result = Trainer(train_config(point, seed, checkpoint_path), device).fit(model, (x, y), held_out, on_step=on_step)
    return model, result, corpus


def save_model(path: Path, model: MixerModel, key: str, extra: Mapping) -> None:
    atomic_save({"key": key, "config": model.cfg.as_dict(), "model": model.state_dict(), **extra}, path)


def lm_shape(point: dict, seq_len: int, batch: int, mode: str) -> dict:
    """The shape columns every row has, for a causal float32 model."""
    point.update(dtype="float32", causal=True, mode=mode, heads=point["n_heads"], batch=batch, seq_len=seq_len,
                 kv_len=seq_len, head_dim=point["d_model"] // point["n_heads"])  # fmt: skip
    return point


def curve(history: list[dict]) -> str:
    """The loss curve as JSON: one entry per evaluation (step, training seconds, estimated val loss, train loss)."""
    return json.dumps([{"step": int(h["step"]), "seconds": float(h.get("seconds", math.nan)),
                        "val_loss": float(h["loss"]), "train_loss": float(h["train_loss"])} for h in history])  # fmt: skip


@register_task
class LMTask(Task):
    name = "lm"
    trains = True
    description = "causal language model (nanoGPT recipe) trained with the method as mixer: validation perplexity"
    keys = (*LM_KEYS, "presets")  # presets: read by normalise_point, never in a row
    metrics = (
        VAL_LOSS,
        PERPLEXITY,
        BITS_PER_CHAR,
        Metric("train_seconds", "s", "lower", None, "training time"),
        Metric("tokens_per_s", "tokens/s", "higher", None, "training tokens/s"),
        PEAK_MEMORY,
        Metric("n_params", "", None, None, "parameters"),
        Metric("steps_done", "", None, None, "steps"),
        LATENCY,  # the trained model's forward pass on one batch
    )
    headline = "val_loss"
    pareto = ("latency_ms", "val_loss")
    section_group = "lm"

    def normalise_point(self, point: dict) -> dict | None:
        point = check_lm_point(self.name, resolve_preset(self.name, point, self.keys))
        return lm_shape(point, point["context"], point["batch_size"], "train")

    def run_cell(self, cell: Cell, make_attention: AttentionFactory, ctx: RunContext) -> dict:
        pt = dict(cell.point)
        check_trainable(get_impl(cell.method, cell.impl).capabilities, f"{cell.method}/{cell.impl}", causal=True)
        ckpt = str(Path(ctx.checkpoint_dir) / f"{cell.cell_id}.pt") if ctx.checkpoint_dir else None
        model, result, corpus = train_lm(pt, cell.seed, make_attention, ctx.device, ckpt)
        scores = full_validation(model, corpus, pt["context"], pt["eval_tokens"], max(pt["batch_size"], 64), ctx.device)
        key = model_key(pt, cell.seed, cell.method, cell.impl, validate_params(cell.method, cell.method_params), corpus)
        if ctx.cache_dir is not None:
            save_model(model_path(ctx.cache_dir, key), model, key, {"val_loss": scores["val_loss"]})
        return {
            **scores,
            "train_loss": result.final_train_loss,
            "train_seconds": result.train_seconds,
            "tokens_per_s": result.tokens_per_s,
            "steps_done": result.steps,
            "stopped": result.stopped,
            "peak_mem_bytes": result.peak_mem_bytes,
            "peak_mem_note": result.peak_mem_note,
            "n_params": sum(p.numel() for p in model.parameters()),
            "vocab_size": corpus.tokenizer.vocab_size,
            "dataset": corpus.source,
            "model_key": key,
            "curve": curve(result.history),
            **forward_latency(model, windows(corpus.validation, pt["context"], stride=pt["context"])[0][: pt["batch_size"]], ctx),
        }

    def summary(self, ok: pd.DataFrame) -> list[SummaryColumn]:
        """Validation loss per method at the largest preset measured (mean over seeds), and its latency."""
        if ok.empty:
            return []
        at = ok[ok["steps"].eq(ok["steps"].max())]
        where = f"preset {', '.join(sorted(at['preset'].astype(str).unique()))}, mean over seeds"
        return quality_with_latency(self, at, "val_loss", where)

    def report_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        from tasks.lm_views import loss_curve_plots

        figures = loss_curve_plots(rows, out_dir)
        text = ("Validation loss during training (nanoGPT's estimate on fixed random validation windows) against "
                "step and against training wall time, one line per method.")  # fmt: skip
        return [Section("Language model: loss curves", text, figures=figures)] if figures else []

    def group_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        """The perplexity table over both protocols (trained with the method; swapped into softmax's model)."""
        from tasks.lm_views import perplexity_table

        table = perplexity_table(rows)
        text = ("Validation loss (nats/token), perplexity per token and bits per character on the whole "
                "validation split (mean over seeds). `train`: the model trained with the method; `swap`: exact "
                "softmax's trained model with the method swapped in, no training (Δ against softmax on the same "
                "tokens).")  # fmt: skip
        return [Section("Perplexity", text, table)] if not table.empty else []

