"""MQAR: the generator's invariants, the point's validation, the learning signal (softmax learns recall,
identity cannot), rows through the runner, and the task's declarations, summary and report section."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bench.measure.hardware import HardwareProfile
from bench.measure.timing import TimingConfig
from bench.sweep import RunSettings, measure_cell
from tasks import get_task, task_defaults
from tasks.base import SHAPE_KEYS, Cell
from tasks.mqar import chance_accuracy, make_mqar, query_slot_probs
from tasks.mqar_views import best_per_size, mqar_table, recall_vs_state_plots

HYPER = ("d_model", "n_layers", "n_heads", "lr", "epochs", "batch_size", "seed", "train_size", "test_size", "vocab",
         "seq_len", "num_kv_pairs")
DERIVED = ("heads", "head_dim", "batch", "kv_len", "causal", "mode")


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


# --- the point: defaults in the YAML only, validated on one line -----------------------------------------------


def test_keys_are_the_yaml_hyper_parameters():
    """Every default of conf/task/mqar.yaml is a declared sweep key (or a shape key), and nothing else is."""
    task = get_task("mqar")
    defaults = task_defaults("mqar")
    assert set(task.keys) == set(defaults) - set(SHAPE_KEYS)
    assert not set(task.keys) & set(SHAPE_KEYS)


def test_normalise_point_only_validates_and_derives_shape_columns():
    task = get_task("mqar")
    defaults = task_defaults("mqar")
    point = task.normalise_point(dict(defaults))
    assert {k: point[k] for k in defaults} == defaults  # no default overridden, none invented
    assert set(point) - set(defaults) == set(DERIVED)
    assert point["heads"] == defaults["n_heads"] and point["head_dim"] == defaults["d_model"] // defaults["n_heads"]
    assert point["batch"] == defaults["batch_size"] and point["kv_len"] == defaults["seq_len"]
    assert point["causal"] is True and point["mode"] == "train"
    assert task.normalise_point(dict(point)) == point  # idempotent: the runner may normalise twice
    task.check_point(point)
    with pytest.raises(ValueError, match=r"^mqar: the point lacks lr \(defaults: conf/task/mqar.yaml\)$"):
        task.normalise_point({k: v for k, v in defaults.items() if k != "lr"})


@pytest.mark.parametrize(
    "key, value, accepts",
    [
        ("lr", "abc", "a number > 0"),
        ("lr", 0, "a number > 0"),
        ("seq_len", 63, "an even integer >= 4"),
        ("vocab", 64, "an integer > seq_len (64)"),
        ("num_kv_pairs", 17, "an integer >= 1 with 4 * num_kv_pairs <= seq_len (64)"),
        ("filler", "noise", "one of: random, zero"),
        ("positions", "rotary", "one of: learned, none"),
        ("epochs", True, "an integer >= 1"),
        ("batch_size", 2.5, "an integer >= 1"),
        ("steps", 0, "null or an integer >= 1"),
        ("warmup_frac", 1.5, "a number in [0, 1]"),
        ("target_accuracy", 2, "null or a number in [0, 1]"),
        ("n_heads", 3, None),  # d_model 64 is not divisible by 3
        ("dtype", "bfloat16", "'float32'"),
        ("causal", False, "True"),
        ("heads", 4, "1"),
    ],
)
def test_normalise_point_rejects_a_bad_value_on_one_line(key, value, accepts):
    with pytest.raises(ValueError) as err:
        get_task("mqar").normalise_point({**task_defaults("mqar"), key: value})
    message = str(err.value)
    assert "\n" not in message and message.startswith("mqar: ")
    named = "d_model" if key == "n_heads" else key
    assert f"{named} must be" in message, message
    if accepts is not None:
        assert accepts in message, message
    assert str(value) in message, message


def test_lr_list_is_a_sweep_of_cells():
    points = get_task("mqar").points(task_defaults("mqar"), {"lr": [1e-4, 1e-3, 1e-2], "d_model": [64, 128]})
    assert len(points) == 6 and {p["lr"] for p in points} == {1e-4, 1e-3, 1e-2}
    assert {p["head_dim"] for p in points} == {64, 128}
    # an integral lr and its float are one cell, not two
    assert get_task("mqar").points(task_defaults("mqar"), {"lr": [1, 1.0]})[0]["lr"] == 1.0
    assert len(get_task("mqar").points(task_defaults("mqar"), {"lr": [1, 1.0]})) == 1


# --- cells through the runner ----------------------------------------------------------


def settings(tmp_path) -> RunSettings:
    profile = HardwareProfile("cpu", "cpu", "test cpu", {"float32": 1.0}, None, None, True, "test")
    return RunSettings(tmp_path, "test", torch.device("cpu"), profile, TimingConfig())


def mqar_cell(method: str, impl: str = "reference", params=None, **overrides) -> Cell:
    point = get_task("mqar").normalise_point({**task_defaults("mqar"), **overrides})
    return Cell(method, impl, "mqar", "cpu", point, params or {})


def test_smoke_softmax_learns_recall_and_identity_stays_at_chance(tmp_path):
    """The learning signal, end to end through the runner: exact softmax solves the smoke preset (it stops
    early at the target accuracy); a model that cannot mix sits at chance."""
    soft = measure_cell(mqar_cell("softmax"), settings(tmp_path))
    assert soft["status"] == "ok", soft["reason"]
    assert soft["accuracy"] >= 0.9, soft["eval_history"]
    ident = measure_cell(mqar_cell("identity", steps=100), settings(tmp_path))
    assert ident["status"] == "ok", ident["reason"]
    assert ident["chance"] == pytest.approx(1 / 64) == chance_accuracy(ident["vocab"])  # among the V - V/2 values
    assert ident["accuracy"] <= ident["chance"] + 0.03
    assert soft["accuracy"] > ident["accuracy"] + 0.5
    assert ident["state_bytes"] == 0 < soft["state_bytes"]
    assert soft["stopped"] == "target" and ident["stopped"] == "steps" and ident["steps_done"] == 100

    task = get_task("mqar")
    declared = [m["name"] for m in json.loads(soft["metrics"])]
    assert declared == [m.name for m in task.metrics]
    assert {m["name"] for m in json.loads(soft["metrics"]) if m["headline"]} == {"accuracy"}
    assert set(task.keys) <= set(soft["keys"]) and "seq_len" in soft["keys"]
    for row in (soft, ident):
        for key in (*HYPER, *declared):
            assert row[key] is not None, key
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["eval_perplexity"] == pytest.approx(2.718281828459045 ** row["eval_loss"])
    assert soft["eval_loss"] < ident["eval_loss"]
    assert soft["heads"] == 1 and soft["head_dim"] == 64 and soft["mode"] == "train" and soft["causal"] is True


@pytest.mark.parametrize("method", ["linear", "deltanet"])
def test_trains_through_a_triton_kernel_backward(tmp_path, method):
    """Trained tasks run with impl=kernel now that the chunked kernels have a backward (interpreted here)."""
    cell = mqar_cell(method, impl="kernel", steps=2, train_size=64, test_size=32, eval_every=2, batch_size=16)
    row = measure_cell(cell, settings(tmp_path))
    assert row["status"] == "ok", row["reason"]
    assert row["interpreted"] is True and 0.0 <= row["accuracy"] <= 1.0 and row["final_loss"] > 0


def test_method_without_backward_gives_unsupported_row(tmp_path):
    row = measure_cell(mqar_cell("hyperattention", impl="kernel"), settings(tmp_path))
    assert row["status"] == "unsupported"
    assert "backward" in row["reason"] or "GPU" in row["reason"]


def test_bad_hand_made_cell_is_an_error_row_not_a_crash(tmp_path):
    cell = Cell("softmax", "reference", "mqar", "cpu", {**task_defaults("mqar"), "seq_len": 63}, {})
    row = measure_cell(cell, settings(tmp_path))
    assert row["status"] == "error" and "seq_len must be an even integer" in row["reason"]


# --- declarations, summary, report -------------------------------------------------------


def test_declarations():
    task = get_task("mqar")
    assert task.headline == "accuracy" and task.pareto == ("train_seconds", "accuracy")
    accuracy = task.metric("accuracy")
    assert (accuracy.unit, accuracy.better, accuracy.judge) == ("fraction", "higher", "drop")
    assert task.metric("train_seconds").unit == "s" and task.metric("train_seconds").better == "lower"
    for name in task.pareto:
        task.metric(name)


def fake_rows() -> pd.DataFrame:
    rows = []
    for method, state, accs in (("softmax", 65536, [0.2, 0.99, 0.5]), ("linear", 8192, [0.1, 0.3, 0.25]),
                                ("identity", 0, [0.01, 0.02, 0.015])):
        for seq_len, kv, shift in ((64, 4, 0.0), (128, 8, -0.1)):
            for lr, acc in zip((1e-4, 1e-3, 1e-2), accs, strict=True):
                rows.append(dict(status="ok", method=method, impl="reference", d_model=64, seq_len=seq_len,
                                 num_kv_pairs=kv, lr=lr, accuracy=max(0.0, acc + shift), state_bytes=state * seq_len // 64,
                                 train_seconds=10.0 * lr * 1e3 + seq_len))
    rows.append(dict(status="unsupported", method="softmax", impl="kernel", d_model=64, seq_len=128,
                     num_kv_pairs=8, lr=1e-3, accuracy=None, state_bytes=None, train_seconds=None))
    return pd.DataFrame(rows)


def test_summary_is_best_lr_at_the_largest_size():
    columns = get_task("mqar").summary(fake_rows()[lambda d: d["status"].eq("ok")])
    assert [(c.metric.name, c.in_table) for c in columns] == [("accuracy", True), ("train_seconds", False)]
    accuracy, seconds = columns
    assert accuracy.where == "N=128, 8 kv pairs, d_model=64, best lr"
    assert accuracy.values[("softmax", "reference")] == pytest.approx(0.89)  # best lr at N=128, not N=64's 0.99
    assert accuracy.values[("linear", "reference")] == pytest.approx(0.2)
    assert seconds.values[("softmax", "reference")] == pytest.approx(10.0 + 128)  # the best-lr run's time
    assert get_task("mqar").summary(fake_rows().iloc[0:0]) == []


def test_report_section_keeps_best_lr_and_spread(tmp_path):
    rows = fake_rows()
    best = best_per_size(rows)
    assert len(best) == 6
    soft = best[(best.method == "softmax") & (best.seq_len == 64)].iloc[0]
    assert soft.accuracy == 0.99 and soft.lr == 1e-3 and soft.acc_min == 0.2 and soft.n_lrs == 3
    (section,) = get_task("mqar").report_sections(rows, tmp_path)
    assert section.title.startswith("MQAR") and section.text
    table = section.table
    assert list(table.columns[:3]) == ["method", "impl", "d_model"]
    assert table.map(lambda v: isinstance(v, str)).all().all()
    first = table.iloc[0].tolist()
    assert first == ["softmax", "reference", "64", "64", "4", "0.990", "0.001", "0.200-0.990 (3)", "64.0 KiB", "74.0"]
    assert [p.name for p in section.figures] == ["mqar_recall_vs_state_n64_kv4.png", "mqar_recall_vs_state_n128_kv8.png"]
    assert all(p.stat().st_size > 0 for p in section.figures)
    assert mqar_table(pd.DataFrame()).empty and recall_vs_state_plots(pd.DataFrame(), tmp_path) == []
    assert get_task("mqar").report_sections(pd.DataFrame(), tmp_path) == []
