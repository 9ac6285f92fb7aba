"""Task `lm_swap`: swap a training-free method into a trained softmax model, and measure perplexity.

The protocol of SEA, HyperAttention, StreamingLLM and MInference: a method
that approximates softmax (every sparse method, `memory_efficient`, any
method declaring `training_free`) should leave a softmax-trained model's
perplexity where it was. One exact-softmax model per model configuration
(`base_preset` of `conf/task/lm.yaml`, plus any `lm` key given here) is
trained once and cached (`<cache_dir>/lm_models/<key>.pt`, the key a hash of
its configuration and data, the same file `lm` writes for `softmax/reference`);
then the cell's method replaces softmax in all layers (`swap_layers: 0`) or
in the last L layers only (HyperAttention's protocol), and the validation
split is scored at `eval_context` tokens per window (non-overlapping, every
token once). The headline is the perplexity increase over exact softmax on
the same tokens at the same context.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from methods import build, get_impl, get_method
from methods.base import Unsupported
from tasks.base import (
    LATENCY,
    AttentionFactory,
    Cell,
    Metric,
    RunContext,
    Section,
    SummaryColumn,
    Task,
    quality_with_latency,
)
from tasks.lm import (
    BITS_PER_CHAR,
    LM_KEYS,
    PERPLEXITY,
    VAL_LOSS,
    check_lm_point,
    corpus_for,
    full_validation,
    lm_shape,  # fmt: skip
    model_config,
    model_key,
    model_path,
    save_model,
    train_lm,
)
from tasks.lm_data import LMCorpus, windows
from tasks.model import MixerModel, forward_latency
from tasks.presets import check_ints, resolve_preset
from tasks.registry import register_task, task_defaults

BASE_METHOD, BASE_IMPL = "softmax", "reference"  # the model every method is swapped into
SWAP_KEYS = ("base_preset", "eval_context", "swap_layers", "eval_batch")
# The `lm` keys that define the base model; `preset` is `base_preset` here.
BASE_KEYS = tuple(k for k in LM_KEYS if k != "preset")


def swap_label(swap_layers: int, n_layers: int) -> str:
    return "all" if swap_layers in (0, n_layers) else f"last {swap_layers}"


def swapped_factory(make_attention: AttentionFactory, n_layers: int, swap_layers: int) -> AttentionFactory:
    """A factory for `MixerModel` (one call per layer, first to last): softmax below, the method in the last L."""
    first_swapped = 0 if swap_layers == 0 else n_layers - swap_layers
    layer = itertools.count()
    return lambda: make_attention() if next(layer) >= first_swapped else build(BASE_METHOD, impl=BASE_IMPL)


def load_weights(model: MixerModel, state: Mapping[str, torch.Tensor]) -> None:
    """The base model's weights into a swapped model: only a method's own internals may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    foreign = [k for k in (*missing, *unexpected) if ".mixer.attn." not in k]
    if foreign:
        raise RuntimeError(f"base checkpoint does not fit the model: {', '.join(foreign[:4])}")


@register_task
class LMSwapTask(Task):
    name = "lm_swap"
    trains = True  # evaluates a trained model, and trains the softmax base when the cache lacks it
    description = "a trained softmax LM with a training-free method swapped in: perplexity increase over softmax"
    keys = (*SWAP_KEYS, *BASE_KEYS)
    metrics = (
        Metric("ppl_increase", "", "lower", "growth", "perplexity increase over softmax"),
        PERPLEXITY,
        VAL_LOSS,
        BITS_PER_CHAR,
        Metric("softmax_perplexity", "", None, None, "exact softmax's perplexity (same tokens)"),
        LATENCY,  # the swapped model's forward pass on one evaluation batch
    )
    headline = "ppl_increase"
    pareto = ("latency_ms", "ppl_increase")
    section_group = "lm"

    def __init__(self) -> None:
        self._base: tuple[tuple[str, Path | None], MixerModel] | None = None  # the last base model: every method of a sweep uses it
        self._softmax_scores: dict[tuple, dict] = {}

    def normalise_point(self, point: dict) -> dict | None:
        """The base model's keys from `lm`'s preset `base_preset` (a key given here wins), then the eval keys."""
        point = dict(point)
        lm = task_defaults("lm")
        base = {**lm, **{k: point[k] for k in BASE_KEYS if point.get(k) is not None}, "preset": point["base_preset"]}
        base = check_lm_point(self.name, resolve_preset("lm", base, LM_KEYS))
        point.update({k: base[k] for k in BASE_KEYS})
        if point.get("eval_context") is None:
            point["eval_context"] = point["context"]
        check_ints(self.name, point, ("eval_context", "eval_batch"))
        check_ints(self.name, point, ("swap_layers",), zero_ok=("swap_layers",))
        if point["eval_context"] > point["context"]:
            raise ValueError(f"{self.name}: eval_context {point['eval_context']} exceeds the model's context "
                             f"{point['context']} (learned positions)")
        if point["swap_layers"] > point["n_layers"]:
            raise ValueError(f"{self.name}: swap_layers {point['swap_layers']} exceeds n_layers {point['n_layers']}")
        return lm_shape(point, point["eval_context"], point["eval_batch"], "fwd")

    def base_model(self, pt: Mapping, seed: int, ctx: RunContext) -> tuple[MixerModel, LMCorpus, str, bool]:
        """The trained softmax model of the point: from memory, from the cache, or trained now (and cached).

        Returns (model, corpus, key, trained_here)."""
        corpus = corpus_for(pt)
        key = model_key(pt, seed, BASE_METHOD, BASE_IMPL, get_method(BASE_METHOD).defaults(), corpus)
        path = model_path(ctx.cache_dir, key) if ctx.cache_dir is not None else None
        if self._base is not None and self._base[0] == (key, path):
            return self._base[1], corpus, key, False
        self._base, self._softmax_scores = None, {}
        trained_here = path is None or not path.exists()
        if trained_here:
            ckpt = str(path.with_suffix(".ckpt")) if path is not None else None
            model, _, corpus = train_lm(pt, seed, lambda: build(BASE_METHOD, impl=BASE_IMPL), ctx.device, ckpt)
            if path is not None:
                save_model(path, model, key, {})
        else:
            model = MixerModel(model_config(pt, corpus.tokenizer.vocab_size), lambda: build(BASE_METHOD, impl=BASE_IMPL))
            load_weights(model, torch.load(path, map_location="cpu", weights_only=True)["model"])
        model.to(ctx.device).eval()
        self._base = ((key, path), model)
        return model, corpus, key, trained_here

    def run_cell(self, cell: Cell, make_attention: AttentionFactory, ctx: RunContext) -> dict:
        pt = dict(cell.point)
        spec = get_method(cell.method)
        if not spec.training_free:
            raise Unsupported(f"{cell.method} is not training-free ({spec.family}): it must be trained with the "
                              "model (task lm); a method that can replace softmax declares training_free")
        get_impl(cell.method, cell.impl).capabilities.check(causal=True, cross=False, mode="fwd", dtype="float32")
        base, corpus, key, trained_here = self.base_model(pt, cell.seed, ctx)
        context, eval_tokens, batch = pt["eval_context"], pt["eval_tokens"], pt["eval_batch"]
        score_key = (key, context, eval_tokens)
        if score_key not in self._softmax_scores:
            self._softmax_scores[score_key] = full_validation(base, corpus, context, eval_tokens, batch, ctx.device)
        reference = self._softmax_scores[score_key]
        model = MixerModel(base.cfg, swapped_factory(make_attention, pt["n_layers"], pt["swap_layers"]))
        load_weights(model, base.state_dict())
        model.to(ctx.device).eval()
        scores = full_validation(model, corpus, context, eval_tokens, batch, ctx.device)
        x = windows(corpus.validation, context, stride=context)[0][:batch]
        return {
            **scores,
            "softmax_perplexity": reference["perplexity"],
            "softmax_val_loss": reference["val_loss"],
            "ppl_increase": scores["perplexity"] - reference["perplexity"],
            "swap": swap_label(pt["swap_layers"], pt["n_layers"]),
            "dataset": corpus.source,
            "model_key": key,
            "base_trained_here": trained_here,
            **forward_latency(model, x, ctx),
        }

    def summary(self, ok: pd.DataFrame) -> list[SummaryColumn]:
        """Perplexity increase per method at the longest evaluation context (mean over seeds and swaps)."""
        if ok.empty:
            return []
        at = ok[ok["eval_context"].eq(ok["eval_context"].max())]
        where = f"base {', '.join(sorted(at['base_preset'].astype(str).unique()))}, context {int(at['eval_context'].max())}"
        return quality_with_latency(self, at, "ppl_increase", where)

    def report_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        from tasks.lm_views import swap_context_plots

        figures = swap_context_plots(rows, out_dir)
        text = ("Perplexity of the trained softmax model with each training-free method swapped in, against the "
                "evaluation context; the dashed line is exact softmax on the same tokens.")  # fmt: skip
        return [Section("Language model: training-free swap", text, figures=figures)] if figures else []

    def group_sections(self, rows: pd.DataFrame, out_dir: Path) -> list[Section]:
        from tasks.registry import get_task

        return get_task("lm").group_sections(rows, out_dir)
