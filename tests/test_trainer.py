"""The model recipe and the trainer: the factory builds one mixer per layer, heads and the causal switch work,
evaluation reports consistent metrics and selects on the one it is told, resume reproduces a run, stops say why."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import attention_factory
from torch import nn

import tasks.model
from methods import Unsupported, get_impl
from tasks.model import MixerModel, ModelConfig, PooledClassifierHead, ShortConv, check_trainable
from tasks.mqar import make_mqar
from tasks.trainer import TrainConfig, Trainer, atomic_save, evaluate, lr_factor


def tiny_data():
    train = make_mqar(96, seq_len=16, vocab=32, num_kv_pairs=2, seed=1)
    test = make_mqar(32, seq_len=16, vocab=32, num_kv_pairs=2, seed=2)
    return (train.inputs, train.labels), (test.inputs, test.labels)


def tiny_model(seed: int = 0, method: str = "softmax", **kw) -> MixerModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab=32, max_len=16, d_model=16, n_layers=2, n_heads=2, conv_kernel=3), **kw})
    return MixerModel(cfg, attention_factory(method))


def cfg(**kw) -> TrainConfig:
    base = dict(lr=3e-3, steps=20, batch_size=16, eval_every=8, seed=3, progress=False)
    return TrainConfig(**{**base, **kw})


class Interrupted(Exception):
    pass


# --- the model recipe -------------------------------------------------------------------------------------------


def test_factory_is_called_once_per_layer():
    """The model takes the runner's factory: one fresh mixer per layer, and it never builds a method itself."""
    calls = []

    def factory():
        calls.append(1)
        return attention_factory("softmax")()

    torch.manual_seed(0)
    model = MixerModel(ModelConfig(vocab=32, max_len=16, d_model=16, n_layers=3, n_heads=2), factory)
    assert len(calls) == 3
    assert len({id(m) for m in model.mixers()}) == 3
    assert not hasattr(tasks.model, "build")  # the task path goes through the factory only


def test_untrainable_methods_are_unsupported_with_a_reason():
    with pytest.raises(Unsupported, match="cannot be trained: backward is not supported"):
        check_trainable(get_impl("hyperattention", "kernel").capabilities, "hyperattention/kernel")
    with pytest.raises(Unsupported, match="non-causal"):  # DeltaNet is a causal recurrence
        tiny_model(method="deltanet", causal=False)


def test_lazy_method_parameters_exist_before_training():
    """Based and DeltaNet create weights on their first call unless told head_dim; the model creates them
    at build time, so the optimizer and the checkpoint see them."""
    for method in ("based", "deltanet"):
        model = tiny_model(method=method)
        names = [n for n, _ in model.named_parameters()]
        assert any("attn." in n for n in names), (method, names)
        n_before = sum(p.numel() for p in model.parameters())
        model(torch.zeros(1, 16, dtype=torch.long))
        assert sum(p.numel() for p in model.parameters()) == n_before, method


@pytest.mark.parametrize("causal, seen", [(True, [0, 1, 2]), (False, [1, 2, 3])])
def test_short_conv_is_causal_or_centred(causal, seen):
    torch.manual_seed(0)
    conv = ShortConv(4, 3, causal=causal)
    x = torch.randn(1, 6, 4, requires_grad=True)
    conv(x)[0, 2].sum().backward()
    touched = (x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == seen


def test_mean_pooling_leaves_out_padding():
    head = PooledClassifierHead(4, 3, "mean", pad_id=0)
    hidden = torch.arange(24.0).view(1, 6, 4)
    tokens = torch.tensor([[5, 6, 7, 0, 0, 0]])
    torch.testing.assert_close(head.pool(hidden, tokens), hidden[:, :3].mean(1))


def test_model_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_classes"):
        ModelConfig(vocab=8, max_len=8, head="classify", n_classes=1, causal=False)
    with pytest.raises(ValueError, match="causal=False"):
        ModelConfig(vocab=8, max_len=8, head="classify", n_classes=2, pooling="cls")
    with pytest.raises(ValueError, match="unknown head"):
        ModelConfig(vocab=8, max_len=8, head="seq2seq")


def marker_data(n: int, seed: int, seq_len: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Token 0 (CLS) first, then filler from [4, 16) with one marker token 1, 2 or 3 somewhere; the label is
    which marker. Read at the CLS position, it is solvable only if the first token sees the later ones."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 16, (n, seq_len), generator=gen)
    x[:, 0] = 0
    y = torch.randint(0, 3, (n,), generator=gen)
    x[torch.arange(n), torch.randint(1, seq_len, (n,), generator=gen)] = 1 + y
    return x, y


def test_bidirectional_classifier_learns_a_separable_task():
    """CLS pooling, causal=False: exact softmax learns the marker's class; the identity mixer, whose CLS
    sees only itself, stays at chance (1/3), so the signal comes from non-causal mixing."""
    train, test = marker_data(512, seed=1), marker_data(150, seed=2)
    accuracy = {}
    for method in ("softmax", "identity"):
        torch.manual_seed(0)
        model_cfg = ModelConfig(vocab=16, max_len=12, d_model=32, n_layers=1, n_heads=2, causal=False,
                                head="classify", n_classes=3, pooling="cls")
        model = MixerModel(model_cfg, attention_factory(method))
        result = Trainer(cfg(steps=120, batch_size=32, eval_every=40, lr=1e-2)).fit(model, train, test)
        accuracy[method] = result.best["accuracy"]
    assert accuracy["softmax"] >= 0.8, accuracy
    assert accuracy["identity"] <= 0.45, accuracy


# --- evaluation and selection ---------------------------------------------------------------------------------


def test_eval_loss_and_perplexity_agree_and_do_not_depend_on_batching():
    _, (x, y) = tiny_data()
    model = tiny_model()
    small, whole = evaluate(model, x, y, 5, "cpu"), evaluate(model, x, y, 1000, "cpu")
    with torch.no_grad():
        logits, targets = model.labelled_logits(x, y)
    assert small["n_targets"] == whole["n_targets"] == int((y != -100).sum()) == len(targets)
    assert small["loss"] == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-5)
    assert small["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert small["accuracy"] == whole["accuracy"] == float((logits.argmax(-1) == targets).float().mean())
    assert small["perplexity"] == math.exp(small["loss"])


class ScriptedEval(nn.Module):
    """Training: a real loss on one weight. The i-th evaluation returns the logits `script[i]` (one batch)."""

    def __init__(self, script: list[torch.Tensor]):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.script, self.evals = script, 0

    def labelled_logits(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            return self.w.expand(len(y), 2), y
        logits = self.script[self.evals]
        self.evals += 1
        return logits, y


# Evaluations at steps 4, 8, 12 of a set whose two labels are 0:
# right but unsure (accuracy 1, loss 0.64); half right but sure (0.5, 0.35); all wrong (0, 2.1).
SCRIPT = [torch.tensor([[0.1, 0.0], [0.1, 0.0]]), torch.tensor([[10.0, 0.0], [0.0, 0.01]]),
          torch.tensor([[0.0, 2.0], [0.0, 2.0]])]


@pytest.mark.parametrize("metric, best_step", [("accuracy", 4), ("loss", 8), ("perplexity", 8)])
def test_selection_and_restore_follow_the_named_metric(metric, best_step):
    train = (torch.zeros(8, 1, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    held_out = (torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    weights = {}
    model = ScriptedEval(SCRIPT)
    result = Trainer(cfg(steps=12, batch_size=4, eval_every=4, metric=metric, restore_best=True)).fit(
        model, train, held_out, on_step=lambda step, loss: weights.__setitem__(step, model.w.detach().clone())
    )
    assert [h["step"] for h in result.history] == [4, 8, 12] and result.stopped == "steps"
    i = best_step // 4 - 1
    assert result.best_step == best_step and result.metric == metric
    assert result.best["loss"] == pytest.approx(float(F.cross_entropy(SCRIPT[i], torch.zeros(2, dtype=torch.long))))
    assert result.best["perplexity"] == pytest.approx(math.exp(result.best["loss"]))
    assert result.final["accuracy"] == 0.0
    assert torch.equal(model.w.detach(), weights[best_step]) and not torch.equal(weights[best_step], weights[12])


# --- the training loop --------------------------------------------------------------------------------------------


def test_resume_matches_uninterrupted_run(tmp_path):
    train, test = tiny_data()
    ref_model = tiny_model()
    ref = Trainer(cfg()).fit(ref_model, train, test)

    ckpt = tmp_path / "run.pt"

    def crash(step, loss):
        if step == 11:  # after the step-10 checkpoint, mid-interval: step 11 is lost and redone
            raise Interrupted

    with pytest.raises(Interrupted):
        Trainer(cfg(checkpoint_path=str(ckpt), checkpoint_every=5)).fit(tiny_model(), train, test, on_step=crash)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 10 and {"model", "optimizer", "scheduler", "rng_cpu", "data", "format"} <= set(state)
    assert state["data"] == {"epoch": 1, "batch": 4}  # 96 // 16 = 6 batches per epoch

    resumed_model = tiny_model(seed=123)  # a different init: everything must come from the checkpoint
    res = Trainer(cfg(checkpoint_path=str(ckpt), checkpoint_every=5)).fit(resumed_model, train, test)
    assert res.steps == ref.steps == 20
    for (name, a), b in zip(ref_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    def timeless(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "seconds"}  # wall time differs between runs

    assert timeless(res.best) == timeless(ref.best) and [h["step"] for h in res.history] == [8, 16, 20]
    seconds = [h["seconds"] for h in res.history]  # the resumed run's clock continues the checkpoint's
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert not list(tmp_path.glob("*.tmp"))


def test_stops_record_why():
    train, test = tiny_data()
    r = Trainer(cfg(target=0.0)).fit(tiny_model(), train, test)
    assert r.stopped == "target" and r.steps == 8
    r = Trainer(cfg(metric="loss", target=math.inf)).fit(tiny_model(), train, test)  # lower is better: <= inf
    assert r.stopped == "target" and r.steps == 8
    r = Trainer(cfg(metric="loss", target=0.0)).fit(tiny_model(), train, test)  # a loss of 0 is never reached
    assert r.stopped == "steps" and r.steps == 20
    r = Trainer(cfg(time_budget_s=0.0)).fit(tiny_model(), train, test)
    assert r.stopped == "budget" and r.steps == 1
    r = Trainer(cfg(steps=4)).fit(tiny_model(), train, test)
    assert r.stopped == "steps" and r.steps == 4 and 0.0 <= r.best["accuracy"] <= 1.0
    assert r.peak_mem_bytes and r.peak_mem_bytes > 0 and "profiler" in r.peak_mem_note
    assert r.tokens_per_s and r.tokens_per_s > 0 and r.final_train_loss > 0
    with pytest.raises(ValueError, match="unknown eval metric 'f1'; choose from: accuracy, loss, perplexity"):
        cfg(metric="f1")


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_atomic_save_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    atomic_save({"a": 1}, path)
    atomic_save({"a": 2}, path)
    assert torch.load(path)["a"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]
