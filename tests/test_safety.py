"""Nothing a results folder, a checkpoint or a config holds is executed: no pickle, weights-only torch loads,
safe YAML, and an HTML report that shows hostile strings as text."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import make_row

from bench.measure.provenance import REPO_ROOT
from bench.report import write_report
from bench.results import write_row
from tasks.trainer import Trainer

SCRIPT = "<script>alert('x')</script>"
SOURCES = [p for d in ("bench", "methods", "tasks", "scripts") for p in (REPO_ROOT / d).rglob("*.py")]


class Payload:
    """An object a pickle-based load would construct, i.e. code a checkpoint could run."""


def test_no_code_loads_pickles_or_unsafe_yaml():
    """Every load in the package is data-only: a new `pickle.load`, `weights_only=False` or `yaml.load(`
    fails here, with the file named."""
    unsafe = re.compile(r"\bpickle\.loads?\(|weights_only\s*=\s*False|\byaml\.(unsafe_)?load\(|\bdill\b|\bmarshal\.loads?\(")
    found = [f"{p.relative_to(REPO_ROOT)}:{i}" for p in SOURCES for i, line in enumerate(p.read_text().splitlines(), 1)
             if unsafe.search(line)]  # fmt: skip
    assert found == []
    loads = [p for p in SOURCES if "torch.load(" in p.read_text()]
    assert loads and all("weights_only=True" in p.read_text() for p in loads)


def test_a_checkpoint_holding_an_object_is_refused(tmp_path):
    """The trainer resumes from checkpoints in the results folder: one that would build an object is rejected,
    not run."""
    path = tmp_path / "evil.ckpt"
    torch.save({"format": 1, "model": Payload()}, path)
    trainer = Trainer.__new__(Trainer)
    trainer.device = torch.device("cpu")
    with pytest.raises(Exception, match="Weights only load failed"):
        trainer._load(path, torch.nn.Linear(1, 1), None, None)


def test_the_html_report_escapes_every_string_it_shows(tmp_path):
    """A method parameter, a reason and a task column carrying markup come out as text, never as a tag."""
    rows = [
        make_row("c1", method_params='{"note": "' + SCRIPT.replace("'", "") + '"}'),
        make_row("c2", impl="sdpa", status="error", reason=f"RuntimeError: {SCRIPT}", latency_ms=None,
                 latency_samples_ms=None),  # fmt: skip
        make_row("c3", impl="kernel", device=f"GPU {SCRIPT}", hardware=SCRIPT),
    ]
    for row in rows:
        write_row(tmp_path, row)
    write_report(tmp_path)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<script>alert" not in page and "onerror" not in page
    assert "&lt;script&gt;alert(" in page  # shown, as text


def test_configs_are_read_with_a_safe_loader(tmp_path):
    """A YAML tag that would construct a Python object is an error, not an object (OmegaConf's loader)."""
    from omegaconf import OmegaConf

    bad = tmp_path / "bad.yaml"
    bad.write_text("x: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor|python/object"):
        OmegaConf.load(bad)
