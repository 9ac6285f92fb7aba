"""Sparse methods on the needle task: they retrieve exactly what their pattern or selection can see.

A sliding window hits needles inside its window and misses those outside;
sinks also keep the very first token; exact top-k finds the needle wherever
it is, at the task's default signal strength (conf/task/needle.yaml).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from methods import build
from tasks.needle import NeedleTask, decode_hits, make_haystack

CONF = Path(__file__).parents[1] / "conf"
DEFAULTS = OmegaConf.to_container(OmegaConf.load(CONF / "task" / "needle.yaml"))
TOPK = OmegaConf.to_container(OmegaConf.load(CONF / "method" / "topk.yaml"))["params"]
N = 1024


def accuracy(name: str, depth: float, **params) -> float:
    point = {**DEFAULTS, "batch": 2, "heads": 4, "seq_len": N, "depth": depth}
    point = NeedleTask().normalise_point(point)
    hay = make_haystack(point, seed=0)
    with torch.no_grad():
        out = build(name, **params)(hay.q, hay.k, hay.v, causal=bool(point["causal"]))
    return float(decode_hits(out, hay.truth).float().mean())


@pytest.mark.parametrize("depth", [0.9, 1.0])
def test_sliding_window_hits_needles_inside_its_window(depth):
    # The query is token N-1; depth 0.9 puts the needle ~100 tokens back, inside a 256-token window.
    assert accuracy("sliding_window", depth, window=256) == 1.0


@pytest.mark.parametrize("depth", [0.0, 0.5])
def test_sliding_window_misses_needles_outside_its_window(depth):
    assert accuracy("sliding_window", depth, window=256) <= 0.25


def test_sinks_keep_the_first_token_only():
    assert accuracy("sink_window", 0.0, sinks=4, window=256) == 1.0
    assert accuracy("sink_window", 0.5, sinks=4, window=256) <= 0.25


@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_topk_hits_every_needle_at_the_default_beta(depth):
    assert accuracy("topk", depth, **TOPK) == 1.0
