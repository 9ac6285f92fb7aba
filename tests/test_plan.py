"""From config to cells: precedence of defaults, suite axes and command-line values."""

import pytest
import torch
from hydra import compose, initialize_config_dir

import bench.run  # noqa: F401 - registers the run_id resolver
from bench.plan import CONF_DIR, plan_cells
from methods import UnknownName
from tasks.base import expand_points

CPU = torch.device("cpu")


def cells_for(*overrides, cli_task_keys=()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return plan_cells(cfg, CPU, "cpu", cli_task_keys)


def test_single_cell_from_the_task_default_point():
    cells = cells_for("method=softmax", "impl=reference", "task=scaling")
    assert len(cells) == 1
    c = cells[0]
    assert (c.method, c.impl, c.task, c.suite) == ("softmax", "reference", "scaling", "single")
    assert c.point["seq_len"] == 1024 and c.point["kv_len"] == 1024 and c.point["mode"] == "fwd"


def test_suite_sweeps_and_cli_task_values_win():
    cells = cells_for("method=softmax", "impl=[reference,sdpa]", "task=scaling", "suite=smoke")
    lengths = {c.point["seq_len"] for c in cells if c.point["mode"] != "decode"}
    assert lengths == {128, 256}
    assert {c.impl for c in cells} == {"reference", "sdpa"}
    # smoke: 2 lengths x 2 causal x 3 modes, decode is causal only -> 2*2*2 + 2 points, x 2 impls
    assert len(cells) == (2 * 2 * 2 + 2) * 2
    decode = [c for c in cells if c.point["mode"] == "decode"]
    assert all(c.point["seq_len"] == 1 and c.point["causal"] for c in decode)
    assert {c.point["kv_len"] for c in decode} == {128, 256}
    cli = cells_for("method=softmax", "impl=sdpa", "task=scaling", "suite=smoke", "task.seq_len=[64]",
                    cli_task_keys=("seq_len",))
    assert {c.point["kv_len"] for c in cli} == {64}


def test_suite_alone_lists_methods_and_tasks():
    cells = cells_for("suite=smoke")
    assert {c.impl for c in cells} == {"reference", "sdpa", "sdpa_math"}
    assert {"softmax", "sliding_window", "linear", "deltanet", "linformer"} <= {c.method for c in cells}
    # every method of one point runs back to back, so they share inputs and the oracle
    first_point = [c for c in cells if c.point == cells[0].point]
    assert cells[: len(first_point)] == first_point
    assert [c.impl for c in cells[:3]] == ["reference", "sdpa", "sdpa_math"]
    # method parameters come from the suite over the method's yaml
    window = next(c for c in cells if c.method == "sliding_window")
    assert window.method_params == {"window": 64}


def test_block_methods_restrict_a_sweep_block():
    cells = cells_for("suite=cpu")
    assert {c.method for c in cells if c.point["mode"] == "fwd_bwd"} == {"softmax"}
    assert {"linear", "deltanet", "softmax"} <= {c.method for c in cells if c.point["mode"] == "fwd"}


def test_auto_suite_is_cpu_without_gpu():
    cells = cells_for("suite=auto")
    assert {c.suite for c in cells} == {"cpu"}


def test_nothing_named_is_an_error():
    with pytest.raises(ValueError, match="name a method"):
        cells_for()


def test_bad_impl_lists_choices():
    with pytest.raises(UnknownName, match="choose from"):
        cells_for("method=softmax", "impl=nope", "task=scaling")


def test_expand_points_product_and_scalars():
    pts = list(expand_points({"a": 1, "b": [1, 2]}, {"c": [3, 4], "a": 5}))
    assert len(pts) == 4 and all(p["a"] == 5 for p in pts)
    assert {(p["b"], p["c"]) for p in pts} == {(1, 3), (1, 4), (2, 3), (2, 4)}


def test_sweep_blocks_are_a_union_without_duplicates():
    cells = cells_for("method=softmax", "impl=sdpa", "suite=cpu", "task=scaling")
    fwd_bwd = {c.point["seq_len"] for c in cells if c.point["mode"] == "fwd_bwd"}
    fwd = {c.point["seq_len"] for c in cells if c.point["mode"] == "fwd"}
    assert fwd == {256, 512, 1024, 2048, 4096} and fwd_bwd == {256, 512, 1024, 2048}
    assert len({c.cell_id for c in cells}) == len(cells)


def test_token_budget_sets_batch():
    cells = cells_for("method=softmax", "impl=sdpa", "task=scaling", "task.tokens=4096", "task.seq_len=[512,1024]",
                      cli_task_keys=("tokens", "seq_len"))
    assert {(c.point["seq_len"], c.point["batch"]) for c in cells} == {(512, 8), (1024, 4)}
    assert all("tokens" not in c.point for c in cells)


def test_suite_selectors_pick_registered_methods(tmp_path):
    """`all` and `family=...` select from the registry; a named entry overrides; `[]` leaves a method out;
    under a selector each method runs only the listed impls it has."""
    from bench.plan import suite_method_entries

    entries = suite_method_entries({"methods": {"family=sparse": ["reference", "flex"], "bigbird": ["kernel"],
                                                "all": ["kernel"], "identity": []}})  # fmt: skip
    from methods import METHODS

    sparse = {m for m, s in METHODS.items() if s.family == "sparse"}
    assert set(entries) == set(METHODS)
    assert all(entries[m]["impls"] == ["reference", "flex"] and not entries[m]["strict"] for m in sparse - {"bigbird"})
    assert entries["bigbird"] == {"impls": ["kernel"], "params": {}, "strict": True}
    assert entries["identity"]["impls"] == [] and entries["linear"]["impls"] == ["kernel"]
    with pytest.raises(ValueError, match="no method of family 'sprase'; families: baseline, exact"):
        suite_method_entries({"methods": {"family=sprase": ["reference"]}})


def test_cpu_suite_has_every_registered_method_and_only_impls_they_have():
    cells = cells_for("suite=cpu")
    from methods import METHODS

    assert {c.method for c in cells} == set(METHODS)
    assert all(c.impl in METHODS[c.method].impls for c in cells)
    assert {c.impl for c in cells if c.method == "softmax"} == {"reference", "sdpa", "sdpa_math", "flex", "kernel"}
    assert {c.impl for c in cells if c.method != "softmax"} == {"reference"}
