"""The trainer: resume reproduces an uninterrupted run, stops say why, checkpoints are atomic."""

from __future__ import annotations

import pytest
import torch

from tasks.model import ModelConfig, TinyLM
from tasks.mqar import make_mqar
from tasks.trainer import TrainConfig, Trainer, atomic_save, lr_factor


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_data():
    train = make_mqar(96, seq_len=16, vocab=32, num_kv_pairs=2, seed=1)
    test = make_mqar(32, seq_len=16, vocab=32, num_kv_pairs=2, seed=2)
    return (train.inputs, train.labels), (test.inputs, test.labels)


def tiny_model(seed: int = 0, method: str = "softmax") -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(ModelConfig(vocab=32, max_len=16, d_model=16, n_layers=2, n_heads=2, conv_kernel=3, method=method))


def cfg(**kw) -> TrainConfig:
    base = dict(lr=3e-3, steps=20, batch_size=16, eval_every=8, seed=3, progress=False)
    return TrainConfig(**{**base, **kw})


class Interrupted(Exception):
    pass


def test_resume_matches_uninterrupted_run(tmp_path):
    train, test = tiny_data()
    ref_model = tiny_model()
    ref = Trainer(cfg()).fit(ref_model, train, test)

    ckpt = tmp_path / "run.pt"

    def crash(step, loss):
        if step == 11:  # after the step-10 checkpoint, mid-interval: steps 11 are lost and redone
            raise Interrupted

    with pytest.raises(Interrupted):
        Trainer(cfg(checkpoint_path=str(ckpt), checkpoint_every=5)).fit(tiny_model(), train, test, on_step=crash)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 10 and {"model", "optimizer", "scheduler", "rng_cpu", "data"} <= set(state)
    assert state["data"] == {"epoch": 1, "batch": 4}  # 96 // 16 = 6 batches per epoch

    resumed_model = tiny_model(seed=123)  # a different init: everything must come from the checkpoint
    res = Trainer(cfg(checkpoint_path=str(ckpt), checkpoint_every=5)).fit(resumed_model, train, test)
    assert res.steps == ref.steps == 20
    for (name, a), b in zip(ref_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert res.accuracy == ref.accuracy and res.best_step == ref.best_step
    assert not list(tmp_path.glob("*.tmp"))


def test_stops_record_why():
    train, test = tiny_data()
    r = Trainer(cfg(target_accuracy=0.0)).fit(tiny_model(), train, test)
    assert r.stopped == "target" and r.steps == 8
    r = Trainer(cfg(time_budget_s=0.0)).fit(tiny_model(), train, test)
    assert r.stopped == "budget" and r.steps == 1
    r = Trainer(cfg(steps=4)).fit(tiny_model(), train, test)
    assert r.stopped == "steps" and r.steps == 4 and 0.0 <= r.accuracy <= 1.0
    assert r.peak_mem_bytes and r.peak_mem_bytes > 0 and "profiler" in r.peak_mem_note
    assert r.tokens_per_s and r.tokens_per_s > 0 and r.final_loss > 0


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


def test_lazy_method_parameters_are_trained():
    """Based and DeltaNet create parameters on their first call unless told head_dim; the model tells them."""
    for method in ("based", "deltanet"):
        model = tiny_model(method=method)
        n_before = sum(p.numel() for p in model.parameters())
        model(torch.zeros(1, 16, dtype=torch.long))
        assert sum(p.numel() for p in model.parameters()) == n_before, method
