"""The Pathfinder generator (tasks/pathfinder_data.py): labels right by construction, balanced, seeded."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tasks.pathfinder_data import DIFFICULTIES, DRAW, PathfinderData, connected, make_pathfinder, plot_examples


def _blobs(image: np.ndarray) -> list[list[tuple[int, int]]]:
    """Markers found independently of the module: 8-connected groups of pixels with a full 3x3 of ink."""
    ink = image > 127
    h, w = ink.shape
    core = np.zeros_like(ink)
    core[1:-1, 1:-1] = np.all([ink[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx]
                               for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    seen, blobs = np.zeros_like(core), []
    for y, x in zip(*np.nonzero(core), strict=True):
        if seen[y, x]:
            continue
        blobs.append([])
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            blobs[-1].append((cy, cx))
            for ny in range(max(cy - 1, 0), min(cy + 2, h)):
                for nx in range(max(cx - 1, 0), min(cx + 2, w)):
                    if core[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return blobs


def _bfs_connected(image: np.ndarray, link: int) -> bool:
    """A plain-Python BFS with the documented rule (ink > 127, linked within Chebyshev distance `link`)."""
    ink = image > 127
    h, w = ink.shape
    core = np.zeros_like(ink)
    core[1:-1, 1:-1] = np.all([ink[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx]
                               for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    ys, xs = np.nonzero(core)
    start, targets = (ys[0], xs[0]), set(zip(ys.tolist(), xs.tolist(), strict=True))
    seen = {start}
    queue = [start]
    while queue:
        cy, cx = queue.pop()
        for ny in range(max(cy - link, 0), min(cy + link + 1, h)):
            for nx in range(max(cx - link, 0), min(cx + link + 1, w)):
                if ink[ny, nx] and (ny, nx) not in seen:
                    seen.add((ny, nx))
                    queue.append((ny, nx))
    return targets <= seen


@pytest.fixture(scope="module")
def sets() -> dict[tuple[int, int], PathfinderData]:
    return {(16, 6): make_pathfinder(300, 16, 6, seed=0), (16, 14): make_pathfinder(300, 16, 14, seed=0),
            (32, 6): make_pathfinder(100, 32, 6, seed=0), (32, 14): make_pathfinder(100, 32, 14, seed=0)}


def test_checker_agrees_with_every_label(sets: dict[tuple[int, int], PathfinderData]) -> None:
    for (res, length), data in sets.items():
        assert data.images.shape == (len(data.labels), res, res) and data.images.dtype == torch.uint8
        assert data.labels.dtype == torch.int64
        assert set(data.images.unique().tolist()) <= {0, 255}
        verdicts = [connected(img) for img in data.images.numpy()]
        assert verdicts == [bool(v) for v in data.labels.tolist()], (res, length)


def test_independent_bfs_agrees_and_two_markers(sets: dict[tuple[int, int], PathfinderData]) -> None:
    """A second, naive implementation of the rule, so a bug shared by generator and checker still fails."""
    for (res, _), data in sets.items():
        imgs, labels = data.images.numpy(), data.labels.tolist()
        for i in range(0, len(labels), 3):
            assert len(_blobs(imgs[i])) == 2
            assert _bfs_connected(imgs[i], DRAW[res].link) == bool(labels[i])


def test_balanced_and_tokens(sets: dict[tuple[int, int], PathfinderData]) -> None:
    for data in sets.values():
        assert int(data.labels.sum()) * 2 == len(data.labels)
    odd = make_pathfinder(7, 16, DIFFICULTIES["baseline"], seed=3)
    assert int(odd.labels.sum()) == 3
    tok = odd.tokens()
    assert tok.shape == (7, 256) and tok.dtype == torch.int64
    assert torch.equal(tok[2, 16:32], odd.images[2, 1].long())  # row-major


def test_seeded() -> None:
    a, b = make_pathfinder(40, 16, 9, seed=5), make_pathfinder(40, 16, 9, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = make_pathfinder(40, 16, 9, seed=6)
    assert not torch.equal(a.images, c.images)


def test_negatives_are_not_just_far_apart() -> None:
    """Both classes draw the same paths and markers: ink per image must not give the label away."""
    data = make_pathfinder(200, 32, 9, seed=1)
    ink = (data.images > 127).flatten(1).sum(1).float()
    pos, neg = ink[data.labels == 1].mean(), ink[data.labels == 0].mean()
    assert abs(float(pos - neg)) < 0.1 * float(ink.mean())


def test_marker_distance_says_nothing_about_the_label(sets: dict[tuple[int, int], PathfinderData]) -> None:
    """A positive's markers end one path, a negative's start two: left alone, negatives sit farther apart
    and a threshold on the distance beats chance (0.70 at 16x16). The classes must have equal histograms."""
    for key, data in sets.items():
        hist: dict[int, Counter] = {0: Counter(), 1: Counter()}
        for img, label in zip(data.images.numpy(), data.labels.tolist(), strict=True):
            a, b = (np.mean(blob, axis=0) for blob in _blobs(img))
            hist[label][round(float(((a - b) ** 2).sum()), 1)] += 1
        assert hist[0] == hist[1], key
        assert len(hist[1]) > 3, key  # the distance does vary


def _tiny(gap: int) -> np.ndarray:
    """16x16: a 3x3 marker at each end of a horizontal line with a hole of `gap` blank pixels."""
    img = np.zeros((16, 16), dtype=np.uint8)
    img[7:10, 1:4] = 255
    img[7:10, 12:15] = 255
    img[8, 4:12] = 255
    img[8, 7 : 7 + gap] = 0
    return img


def test_checker_on_hand_made_images() -> None:
    assert connected(_tiny(0), link=1)
    assert connected(_tiny(1), link=2)  # one blank pixel: bridged at link 2, not at link 1
    assert not connected(_tiny(1), link=1)
    assert not connected(_tiny(3), link=2)
    diagonal = np.zeros((16, 16), dtype=np.uint8)
    diagonal[0:3, 0:3] = diagonal[13:16, 13:16] = 255
    diagonal[np.arange(3, 13), np.arange(3, 13)] = 255  # touching only diagonally: 8-connected
    assert connected(diagonal, link=1)
    with pytest.raises(ValueError, match="2 markers"):
        connected(np.zeros((16, 16), dtype=np.uint8))


def test_plot_examples(tmp_path, sets: dict[tuple[int, int], PathfinderData]) -> None:
    out = plot_examples(sets[(32, 14)], tmp_path / "pf" / "examples.png", per_class=3)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"n": 0}, "n"), ({"n": 2.5}, "n"), ({"resolution": 20}, "resolution"), ({"contour_length": 1}, "contour_length"),
    ({"seed": -1}, "seed"), ({"distractors": -1}, "distractors"), ({"distractors": True}, "distractors"),
])
def test_bad_arguments(kwargs: dict, name: str) -> None:
    args = {"n": 4, "resolution": 16, "contour_length": 6, "seed": 0} | kwargs
    with pytest.raises(ValueError) as err:
        make_pathfinder(**args)
    assert str(err.value).startswith(name) and "\n" not in str(err.value)


def test_bad_checker_arguments() -> None:
    with pytest.raises(ValueError, match="^link"):
        connected(np.zeros((20, 20), dtype=np.uint8))
    with pytest.raises(ValueError, match="^image"):
        connected(np.zeros((2, 16, 16), dtype=np.uint8))
