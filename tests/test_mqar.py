"""MQAR: the generator's invariants, the learning signal (softmax learns recall, identity cannot), rows, report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from bench.hardware import HardwareProfile
from bench.mqar_report import best_per_size, mqar_plots, mqar_table
from bench.runner import RunSettings, measure_cell
from bench.timing import TimingConfig
from tasks import get_task
from tasks.base import Cell
from tasks.mqar import chance_accuracy, make_mqar, query_slot_probs

CONF = Path(__file__).resolve().parent.parent / "conf" / "task" / "mqar.yaml"
HYPER = ("d_model", "n_layers", "n_heads", "lr", "epochs", "batch_size", "seed", "train_size", "test_size", "vocab",
         "seq_len", "num_kv_pairs")


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- generator -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(seq_len=63, vocab=128, num_kv_pairs=4), "even"),
        (dict(seq_len=64, vocab=64, num_kv_pairs=4), "vocab must be larger"),
        (dict(seq_len=64, vocab=128, num_kv_pairs=17), "4 \\* num_kv_pairs"),
        (dict(seq_len=64, vocab=128, num_kv_pairs=0), "4 \\* num_kv_pairs"),
    ],
)
def test_generator_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make_mqar(4, seed=0, **kw)
    with pytest.raises(ValueError, match="filler"):
        make_mqar(4, seq_len=64, vocab=128, num_kv_pairs=4, seed=0, filler="noise")


@pytest.mark.parametrize("filler", ["random", "zero"])
def test_generator_invariants(filler):
    n, seq_len, vocab, p = 200, 64, 128, 8
    d = make_mqar(n, seq_len=seq_len, vocab=vocab, num_kv_pairs=p, seed=5, filler=filler)
    x, y = d.inputs, d.labels
    assert x.shape == y.shape == (n, seq_len) and x.dtype == y.dtype == torch.long
    keys, values = x[:, 0 : 2 * p : 2], x[:, 1 : 2 * p : 2]
    assert ((keys >= 1) & (keys < vocab // 2)).all() and ((values >= vocab // 2) & (values < vocab)).all()
    assert all(len(set(r.tolist())) == p for r in keys) and all(len(set(r.tolist())) == p for r in values)
    assert ((x >= 0) & (x < vocab)).all()
    assert (y[:, : 2 * p] == -100).all()  # no label inside the pairs
    for i in range(n):
        pos = (y[i] != -100).nonzero().flatten()
        assert len(pos) == p
        assert ((pos - 2 * p) % 2 == 0).all()  # queries start a two-token slot
        queried = x[i, pos]
        assert sorted(queried.tolist()) == sorted(keys[i].tolist())  # each key queried exactly once
        answer = dict(zip(keys[i].tolist(), values[i].tolist(), strict=True))
        assert [answer[k] for k in queried.tolist()] == y[i, pos].tolist()  # the label is the key's value
    if filler == "zero":
        labelled = y != -100
        rest = x[:, 2 * p :][~labelled[:, 2 * p :]]
        assert (rest == 0).all()


def test_generator_is_deterministic_per_seed():
    kw = dict(seq_len=64, vocab=128, num_kv_pairs=4)
    a, b, c = make_mqar(50, seed=1, **kw), make_mqar(50, seed=1, **kw), make_mqar(50, seed=2, **kw)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


def test_query_positions_follow_the_power_law():
    p = query_slot_probs(28)
    assert p.sum().item() == pytest.approx(1.0) and (p[:-1] > p[1:]).all()
    d = make_mqar(2000, seq_len=64, vocab=128, num_kv_pairs=4, seed=0)
    slot = ((d.labels != -100).nonzero()[:, 1] - 8) // 2
    counts = torch.bincount(slot, minlength=28).float()
    assert counts[:7].sum() > counts[-7:].sum()  # early slots are favoured


# --- cells through the runner ----------------------------------------------------------


def settings(tmp_path) -> RunSettings:
    profile = HardwareProfile("cpu", "cpu", "test cpu", {"float32": 1.0}, None, None, True, "test")
    return RunSettings(tmp_path, "test", torch.device("cpu"), profile, TimingConfig())


def smoke_point(**overrides) -> dict:
    defaults = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF)).items() if k != "name"}
    return get_task("mqar").normalise_point({**defaults, **overrides})


def mqar_row(tmp_path, method: str, impl: str = "reference", params=None, **overrides) -> dict:
    cell = Cell(method, impl, "mqar", "cpu", smoke_point(**overrides), params or {})
    return measure_cell(cell, settings(tmp_path))


def test_smoke_softmax_learns_recall_and_identity_stays_at_chance(tmp_path):
    """The learning signal: exact softmax solves the smoke preset; a model that cannot mix sits at chance."""
    soft = mqar_row(tmp_path, "softmax")
    assert soft["status"] == "ok", soft["reason"]
    assert soft["accuracy"] >= 0.9, soft["eval_history"]
    ident = mqar_row(tmp_path, "identity", steps=200)
    assert ident["status"] == "ok", ident["reason"]
    chance = chance_accuracy(ident["vocab"])  # a guess among the V - V/2 values
    assert ident["chance"] == pytest.approx(1 / 64)
    assert ident["accuracy"] <= chance + 0.03
    assert soft["accuracy"] > ident["accuracy"] + 0.5
    assert ident["state_bytes"] == 0 < soft["state_bytes"]

    for row in (soft, ident):
        for key in HYPER:
            assert row[key] is not None, key
        for key in ("train_seconds", "tokens_per_s", "final_loss", "best_step", "stopped", "peak_mem_bytes"):
            assert row[key] is not None, key
        assert 0.0 <= row["accuracy"] <= 1.0
    assert soft["stopped"] == "target" and ident["stopped"] == "steps"
    assert soft["heads"] == 1 and soft["head_dim"] == 64 and soft["mode"] == "train" and soft["causal"] is True


def test_method_without_backward_gives_unsupported_row(tmp_path):
    row = mqar_row(tmp_path, "softmax", impl="kernel")
    assert row["status"] == "unsupported"
    assert "backward" in row["reason"] or "GPU" in row["reason"]


def test_bad_point_is_an_error_row_not_a_crash(tmp_path):
    row = mqar_row(tmp_path, "softmax", seq_len=63, steps=1)
    assert row["status"] == "error" and "even" in row["reason"]


def test_lr_list_is_a_sweep_of_cells():
    defaults = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF)).items() if k != "name"}
    points = get_task("mqar").points(defaults, {"lr": [1e-4, 1e-3, 1e-2], "d_model": [64, 128]})
    assert len(points) == 6 and {p["lr"] for p in points} == {1e-4, 1e-3, 1e-2}


# --- report ---------------------------------------------------------------------------


def fake_rows() -> pd.DataFrame:
    rows = []
    for method, state, accs in (("softmax", 65536, [0.2, 0.99, 0.5]), ("linear", 8192, [0.1, 0.3, 0.25]),
                                ("identity", 0, [0.01, 0.02, 0.015])):
        for lr, acc in zip((1e-4, 1e-3, 1e-2), accs, strict=True):
            rows.append(dict(task="mqar", status="ok", method=method, impl="reference", d_model=64, seq_len=64,
                             num_kv_pairs=4, lr=lr, accuracy=acc, state_bytes=state, train_seconds=10.0))
    rows.append(dict(task="mqar", status="unsupported", method="softmax", impl="kernel", d_model=64, seq_len=64,
                     num_kv_pairs=4, lr=1e-3, accuracy=None, state_bytes=None, train_seconds=None))
    rows.append(dict(task="scaling", status="ok", method="softmax", impl="reference", accuracy=None))
    return pd.DataFrame(rows)


def test_report_keeps_best_lr_and_spread(tmp_path):
    best = best_per_size(fake_rows())
    assert len(best) == 3
    soft = best[best.method == "softmax"].iloc[0]
    assert soft.accuracy == 0.99 and soft.lr == 1e-3 and soft.acc_min == 0.2 and soft.n_lrs == 3
    table = mqar_table(fake_rows())
    assert table.splitlines()[0].startswith("| method | impl | d_model")
    assert "| softmax | reference | 64 | 64 | 4 | 0.990 | 0.001 | 0.200-0.990 (3) | 64.0 KiB |" in table
    paths = mqar_plots(fake_rows(), tmp_path)
    assert [p.name for p in paths] == ["mqar_recall_vs_state_n64_kv4.png"] and paths[0].stat().st_size > 0
    assert mqar_table(pd.DataFrame()) == "" and mqar_plots(pd.DataFrame(), tmp_path) == []
