"""Perplexity tasks (issue 12): `lm` trains the model with each method, `lm_swap` swaps methods into softmax's.

Offline: the corpus is the shared Tiny Shakespeare (tasks/lm_data.py checks its sha256).
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.measure.timing import TimingConfig
from methods import Unsupported, build
from tasks import TASKS, task_defaults
from tasks.base import Cell, RunContext
from tasks.lm import corpus_for, full_validation, model_config, train_lm
from tasks.lm_swap import swapped_factory
from tasks.model import MixerModel

pytestmark = pytest.mark.shared_data  # every test here trains or scores on Tiny Shakespeare

QUICK = TimingConfig(warmup=0, min_time_s=0.0, min_repeats=2, max_repeats=2)


def point(task: str = "lm", **overrides) -> dict:
    return TASKS[task].points(task_defaults(task), overrides)[0]


def ctx(tmp_path, cache: bool = True) -> RunContext:
    return RunContext(device=torch.device("cpu"), timing=QUICK, measure_memory=False,
                      checkpoint_dir=tmp_path / "ckpt", cache_dir=tmp_path / "cache" if cache else None)


def run(task: str, method: str, tmp_path, params: dict | None = None, seed: int = 0, **overrides) -> dict:
    params = params or {}
    cell = Cell(method, "reference", task, "cpu", point(task, **overrides), params, seed)
    return TASKS[task].run_cell(cell, lambda: build(method, impl="reference", **params), ctx(tmp_path))


def softmax() -> object:
    return build("softmax", impl="reference")


def test_uniform_model_perplexity_is_the_vocabulary_size():
    pt = point()
    corpus = corpus_for(pt)
    vocab = corpus.tokenizer.vocab_size
    model = MixerModel(model_config(pt, vocab), softmax)
    with torch.no_grad():
        model.head.proj.weight.zero_()  # tied to the embedding: every logit is 0, the prediction uniform
    scores = full_validation(model, corpus, pt["context"], pt["eval_tokens"], 64, "cpu")
    assert scores["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert scores["val_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert scores["bits_per_char"] == pytest.approx(math.log2(vocab), rel=1e-6)  # char tokens: 1 token a char
    assert scores["val_tokens"] == (pt["eval_tokens"] // pt["context"]) * pt["context"]


def test_short_training_learns_and_a_frozen_model_does_not(tmp_path):
    """The learning signal: softmax's smoke run ends far below the uniform loss; at lr ~ 0 it stays there."""
    row = run("lm", "softmax", tmp_path)
    uniform = math.log(row["vocab_size"])
    assert row["val_loss"] < uniform - 1.0, row["val_loss"]
    assert row["perplexity"] == pytest.approx(math.exp(row["val_loss"]))
    assert row["steps_done"] == point()["steps"] and row["n_params"] > 0
    curve = __import__("json").loads(row["curve"])
    every = point()["eval_every"]
    assert [c["step"] for c in curve] == [every, 2 * every] and curve[-1]["val_loss"] < curve[0]["val_loss"]
    assert curve[-1]["seconds"] > curve[0]["seconds"] > 0
    frozen = run("lm", "softmax", tmp_path, lr=1e-9, min_lr=0.0)
    assert abs(frozen["val_loss"] - uniform) < 0.1, frozen["val_loss"]


def test_resumed_training_ends_where_an_uninterrupted_one_ends(tmp_path):
    pt = point(steps=30, eval_every=10, dropout=0.1)  # dropout: the RNG state must be restored too

    class Stop(Exception):
        pass

    def interrupt(step: int, loss: float) -> None:
        if step == 15:  # after the step-10 checkpoint, before the step-20 one
            raise Stop

    ckpt = str(tmp_path / "resume.pt")
    with pytest.raises(Stop):
        train_lm(pt, 0, softmax, "cpu", ckpt, on_step=interrupt)
    resumed, r_result, corpus = train_lm(pt, 0, softmax, "cpu", ckpt)
    straight, s_result, _ = train_lm(pt, 0, softmax, "cpu", None)
    assert r_result.steps == s_result.steps == 30
    assert r_result.final["loss"] == pytest.approx(s_result.final["loss"], abs=1e-6)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_window_as_wide_as_the_context_reproduces_softmax(tmp_path):
    wide = run("lm_swap", "sliding_window", tmp_path, params={"window": 64})
    assert wide["base_trained_here"] is True and wide["swap"] == "all"
    assert abs(wide["ppl_increase"]) < 1e-4 * wide["softmax_perplexity"]
    narrow = run("lm_swap", "sliding_window", tmp_path, params={"window": 2})
    assert narrow["base_trained_here"] is False and narrow["model_key"] == wide["model_key"]
    assert narrow["ppl_increase"] > 0.05 * narrow["softmax_perplexity"], narrow
    assert narrow["softmax_perplexity"] == wide["softmax_perplexity"]  # the same tokens, the same model
    last = run("lm_swap", "sliding_window", tmp_path, params={"window": 2}, swap_layers=1)
    assert last["swap"] == "last 1" and last["perplexity"] != narrow["perplexity"]


def test_the_base_model_comes_from_the_cache(tmp_path):
    """A fresh task instance (a later run) loads the cached softmax model instead of training it again."""
    first = run("lm_swap", "softmax", tmp_path)
    fresh = type(TASKS["lm_swap"])()
    pt = point("lm_swap")
    row = fresh.run_cell(Cell("softmax", "reference", "lm_swap", "cpu", pt, {}, 0), softmax, ctx(tmp_path))
    assert row["base_trained_here"] is False and row["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6)
    assert first["ppl_increase"] == 0.0


def test_the_lm_task_caches_the_model_lm_swap_uses(tmp_path):
    trained = run("lm", "softmax", tmp_path, steps=20, eval_every=10)
    swapped = run("lm_swap", "softmax", tmp_path, steps=20, eval_every=10)
    assert swapped["model_key"] == trained["model_key"] and swapped["base_trained_here"] is False
    assert swapped["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-6)


def test_swapped_factory_puts_the_method_in_the_last_layers_only():
    made = swapped_factory(lambda: build("sliding_window", impl="reference", window=4), n_layers=3, swap_layers=1)
    assert [made().method for _ in range(3)] == ["softmax", "softmax", "sliding_window"]
    every = swapped_factory(lambda: build("sliding_window", impl="reference", window=4), n_layers=2, swap_layers=0)
    assert [every().method for _ in range(2)] == ["sliding_window", "sliding_window"]


def test_methods_that_need_training_are_not_swapped(tmp_path):
    with pytest.raises(Unsupported, match="linear is not training-free"):
        run("lm_swap", "linear", tmp_path)
    with pytest.raises(Unsupported, match="causal attention is not supported"):
        run("lm", "linformer", tmp_path)


@pytest.mark.parametrize("task,overrides,message", [
    ("lm", {"preset": "huge"}, "lm: unknown preset 'huge'; choose from: smoke, shakespeare_char_cpu, shakespeare_char"),
    ("lm", {"steps": 0}, "lm: steps must be an int >= 1, got 0"),
    ("lm", {"autocast": "fp8"}, "lm: unknown autocast 'fp8'; choose from: null, bf16, fp16"),
    ("lm", {"n_heads": 3}, "lm: d_model (32) must be divisible by n_heads (3)"),
    ("lm_swap", {"eval_context": 128}, "lm_swap: eval_context 128 exceeds the model's context 32"),
    ("lm_swap", {"swap_layers": 5}, "lm_swap: swap_layers 5 exceeds n_layers 2"),
    ("lm_swap", {"base_preset": "nope"}, "lm: unknown preset 'nope'"),
])  # fmt: skip
def test_bad_points_fail_on_one_line(task, overrides, message):
    with pytest.raises(ValueError) as err:
        point(task, **overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_lm_swap_takes_its_base_from_the_lm_preset():
    swap, lm = point("lm_swap", base_preset="shakespeare_char_cpu"), point("lm", preset="shakespeare_char_cpu")
    assert swap["context"] == lm["context"] == 64 and swap["eval_context"] == 64 and swap["steps"] == lm["steps"]
    assert point("lm_swap", base_preset="shakespeare_char_cpu", steps=200)["steps"] == 200
