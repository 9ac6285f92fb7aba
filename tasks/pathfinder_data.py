"""Pathfinder images (Linsley et al. 2018, used by LRA as `Pathfinder` and `Path-X`), generated offline.

A building block of the LRA `pathfinder` task (issue 11): this module only draws the images and checks
them; it registers no task. Written from the published description of Linsley et al.'s generator, not
its code.

What an image holds (grayscale uint8, 0 background, 255 ink, no anti-aliasing):

- Two circular markers.
- Two *main* paths of `contour_length` paddles each, plus `distractors` more paths of the same length.
  Positive: both markers sit on the two ends of main path 1. Negative: one marker sits on the start of
  main path 1, the other on the start of main path 2. Both classes thus have the same ink budget (the
  same number of paths, paddles and markers), so counting pixels says nothing about the label.
- A path is a dashed curve: `paddle`-long straight segments separated by `gap`-long holes, with the
  direction turning by a uniform angle in [-max_turn, max_turn] between consecutive paddles.
  Lengths are in the Chebyshev metric (a paddle of length L covers exactly L+1 pixels along its
  dominant axis; a gap of g leaves exactly g-1 blank pixels), so every dash and every hole is visible
  at any orientation, which Euclidean lengths at these resolutions would not guarantee.

The connectivity rule (what `connected` decides, and what the label means). Ink is a pixel > 127.
Two ink pixels are linked when their Chebyshev distance is <= `link` (i.e. the checker dilates by the
gap: `link = gap`, which bridges every hole of a path and nothing wider). The markers are the
8-connected components of the ink pixels whose full 3x3 neighbourhood is ink (a 1-pixel-wide path
never has one; a disc of radius >= 1.5 always does). The image is positive iff the two markers are in
one linked component.

Right by construction: every candidate image is run through the same checker, and kept only if (a) it
has exactly two markers, (b) its linked components are exactly its paths (no path touches another
within `link`, in either class, so touching is no shortcut), and (c) the checker's verdict equals the
intended label. Rejected slots are redrawn, so the checker agrees with every label returned.

No shortcut through the markers' distance: a positive's markers are the two ends of one path, a
negative's the starts of two, so left alone negatives sit farther apart (a threshold on the distance
scored 0.70 held out at 16x16). Valid candidates are therefore kept in pairs, a positive with a negative
whose markers are exactly as far apart (`_pair_by_distance`), and the classes' distance histograms are
equal value for value (`scripts/pathfinder_distance_cue.py`: 0.500).

How paths are made (as Linsley et al.'s generator places contours clear of each other, not by blind
rejection): each path's shape is the most compact (bounding-box area, randomly weighted) of `tries`
random shapes that fit the canvas and whose two ends are at least min(contour/4, room/3) apart (no
closed loops; applied to every path so it does not depend on the label); a per-path curvature plus
jitter, clipped to +-max_turn, lets long contours bend to fit. Paths then go in one at a time at a
uniformly drawn translation that keeps them clear of the ink already drawn (a grouped convolution of
the path mask with the dilated ink finds every clear translation at once).

Drawing parameters per resolution (`DRAW`):
- 16 (smoke): paddle 1 (2 px dashes), gap 1 (no blank pixel: consecutive paddles touch, 8-connected;
  the dashes show only as direction changes), max turn 60 deg, marker 3x3, 0 distractors, link 1.
  With visible holes (gap 2) two separated 14-paddle paths do not fit in 16x16 (acceptance ~2%).
- 32 (LRA Pathfinder, 1,024 tokens): paddle 1, gap 2 (one blank pixel), max turn 45, marker 3x3,
  1 distractor, link 2.
- 64: paddle 2, gap 2, max turn 45, marker radius 2, 2 distractors, link 2.
- 128 (Path-X, 16,384 tokens): paddle 4, gap 3, max turn 45, marker radius 3, 4 distractors, link 3.
LRA's difficulties are contour lengths 6 / 9 / 14 (`DIFFICULTIES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIFFICULTIES = {"baseline": 6, "intermediate": 9, "hard": 14}  # LRA's contour lengths, in paddles
INK_THRESHOLD = 127  # a pixel above this is ink
_MAX_ROUNDS = 400  # redraw rounds before giving up on a too-tight parameter set


@dataclass(frozen=True)
class DrawParams:
    """How one resolution is drawn; lengths in pixels (Chebyshev metric, see the module docstring)."""

    paddle: int  # a paddle covers paddle+1 pixels along its dominant axis
    gap: int  # a hole between paddles leaves gap-1 blank pixels; the checker links ink within `gap`
    marker_radius: float  # marker disc: offsets with dy^2 + dx^2 <= r^2
    max_turn_deg: float  # turn between consecutive paddles, uniform in [-max_turn, max_turn]
    distractors: int  # default number of distractor paths

    @property
    def link(self) -> int:
        """The checker's link distance: exactly the gap, so holes are bridged and nothing wider is."""
        return self.gap


DRAW: dict[int, DrawParams] = {
    16: DrawParams(paddle=1, gap=1, marker_radius=1.5, max_turn_deg=60.0, distractors=0),
    32: DrawParams(paddle=1, gap=2, marker_radius=1.5, max_turn_deg=45.0, distractors=1),
    64: DrawParams(paddle=2, gap=2, marker_radius=2.0, max_turn_deg=45.0, distractors=2),
    128: DrawParams(paddle=4, gap=3, marker_radius=3.0, max_turn_deg=45.0, distractors=4),
}


@dataclass
class PathfinderData:
    images: torch.Tensor  # (n, H, W) uint8, 0 or 255
    labels: torch.Tensor  # (n,) int64, 1 = the markers are connected

    def tokens(self) -> torch.Tensor:
        """(n, H*W) int64 pixel tokens in row-major order: the sequence a model reads (LRA's layout)."""
        return self.images.reshape(self.images.shape[0], -1).long()


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _disc(radius: float) -> np.ndarray:
    r = int(math.floor(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = dy**2 + dx**2 <= radius**2
    return np.stack([dy[keep], dx[keep]], axis=1)  # (K, 2)


def _components(mask: torch.Tensor, link: int) -> torch.Tensor:
    """Label propagation: each ink pixel ends with the largest pixel id of its linked component (0 off ink).

    Linked = Chebyshev distance <= link, so a (2*link+1)^2 max-pool per step; batched over images, which
    is why it is cheap enough to check every candidate image.
    """
    b, h, w = mask.shape
    m = mask.float()
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w)
    lab = ids * m
    k = 2 * link + 1
    while True:
        before = lab
        for _ in range(2):
            lab = F.max_pool2d(lab.unsqueeze(1), k, stride=1, padding=link).squeeze(1) * m
            # pointer jump: a label is a pixel id of the same component whose own label is >= it
            flat = lab.reshape(b, h * w)
            jump = flat.gather(1, (flat.long() - 1).clamp(min=0)) * m.reshape(b, h * w)
            lab = torch.maximum(flat, jump).view(b, h, w)
        if torch.equal(lab, before):
            return lab


def _analyse(images: torch.Tensor, link: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: linked ink components, markers, whether the markers are joined, and their distance.

    `joined` and `distance` (Euclidean, between the markers' centroids, in pixels) are only meaningful
    where exactly two markers were found (False and NaN elsewhere).
    """
    b, h, w = images.shape
    ink = images > INK_THRESHOLD
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w)
    comp = _components(ink, link)
    n_comp = (ink & (comp == ids)).sum(dim=(1, 2))
    inkf = ink.float().unsqueeze(1)
    inkf = F.pad(inkf, (1, 1, 1, 1), value=0.0)  # off the canvas is background
    core = (-F.max_pool2d(-inkf, 3, stride=1)).squeeze(1) > 0.5  # erosion by 3x3
    core &= ink
    blob = _components(core, 1)
    roots = core & (blob == ids)
    n_blobs = roots.sum(dim=(1, 2))
    joined = torch.zeros(b, dtype=torch.bool)
    distance = torch.full((b,), float("nan"))
    two = n_blobs == 2
    if two.any():
        idx = torch.nonzero(roots & two.view(b, 1, 1))  # (2 * k, 3), sorted by image
        idx = idx.view(-1, 2, 3)
        img = idx[:, 0, 0]
        first = comp[img, idx[:, 0, 1], idx[:, 0, 2]]
        second = comp[img, idx[:, 1, 1], idx[:, 1, 2]]
        joined[img] = first == second
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1).float()
        centres = []
        for j in range(2):
            root_id = ids[0, idx[:, j, 1], idx[:, j, 2]].view(-1, 1, 1)
            member = (blob[img] == root_id).float().unsqueeze(-1)  # (k, h, w, 1): that marker's core
            centres.append((member * yx).sum(dim=(1, 2)) / member.sum(dim=(1, 2)))
        distance[img] = (centres[0] - centres[1]).norm(dim=-1)
    return n_comp, n_blobs, joined, distance


def connected(image: np.ndarray | torch.Tensor, link: int | None = None) -> bool:
    """Whether the two markers of one (H, W) image are in one linked ink component (module docstring).

    `link` defaults to the drawing gap of the image's resolution (`DRAW`), and must be given for others.
    """
    img = torch.as_tensor(np.asarray(image))
    if img.dim() != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {tuple(img.shape)}")
    if link is None:
        if img.shape[0] != img.shape[1] or img.shape[0] not in DRAW:
            raise ValueError(f"link must be given for a {img.shape[0]}x{img.shape[1]} image (known: {sorted(DRAW)})")
        link = DRAW[img.shape[0]].link
    link = _check_int("link", link, 1)
    _, n_blobs, joined, _ = _analyse(img.unsqueeze(0), link)
    if int(n_blobs[0]) != 2:
        raise ValueError(f"image must hold exactly 2 markers, found {int(n_blobs[0])}")
    return bool(joined[0])


def _shapes(b: int, n_paths: int, length: int, p: DrawParams, rng: np.random.Generator,
            room: int, tries: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (b, P, length*(paddle+1), 2) of each path, and whether each fits in `room` pixels.

    Each path is the first of `tries` random shapes whose bounding box fits: a long contour must bend to
    fit a small canvas, and this conditions on it bending rather than rejecting whole images.
    """
    turn = math.radians(p.max_turn_deg)
    shape = (b, n_paths, tries)
    theta0 = rng.uniform(0.0, 2 * math.pi, (*shape, 1))
    bend = rng.uniform(-turn, turn, (*shape, 1))  # a per-path curvature, so long contours can curl
    turns = np.clip(bend + rng.uniform(-turn / 2, turn / 2, (*shape, length - 1)), -turn, turn)
    theta = theta0 + np.concatenate([np.zeros((*shape, 1)), np.cumsum(turns, axis=-1)], axis=-1)
    u = np.stack([np.sin(theta), np.cos(theta)], axis=-1)  # (..., N, 2) as (dy, dx)
    v = u / np.abs(u).max(axis=-1, keepdims=True)  # unit step in the Chebyshev metric
    steps = (p.paddle + p.gap) * v
    starts = np.cumsum(steps, axis=-2) - steps  # exclusive cumsum: paddle k starts after k paddles + gaps
    phase = rng.uniform(0.0, 1.0, (*shape, 1, 1, 2))
    t = np.arange(p.paddle + 1, dtype=np.float64).reshape(-1, 1)
    pts = phase + starts[..., None, :] + t * v[..., None, :]
    pix = np.floor(pts + 0.5).astype(np.int64).reshape(*shape, -1, 2)
    ext = pix.max(axis=-2) - pix.min(axis=-2) + 1
    # ends at least a quarter of the contour (or a third of the room) apart: no closed loops, so a positive's markers are not simply
    # next to each other (applied to every path, so the rule itself does not depend on the label)
    ends = np.abs(pix[..., -1, :] - pix[..., 0, :]).max(axis=-1)
    fits = (ext <= room).all(axis=-1) & (ends >= min(length * (p.paddle + p.gap) / 4, room / 3))  # (b, P, tries)
    # prefer compact shapes (they leave room for the others), but softly: the tightest curls put a
    # positive's two markers together, and would be rejected for positives only
    area = ext.prod(axis=-1) * rng.uniform(1.0, 3.0, fits.shape)
    first = np.where(fits, area, np.inf).argmin(axis=-1)
    bi, pi = np.meshgrid(np.arange(b), np.arange(n_paths), indexing="ij")
    return pix[bi, pi, first], fits.any(axis=-1).all(axis=-1)


def _draw(labels: np.ndarray, s: int, length: int, n_paths: int, p: DrawParams,
          rng: np.random.Generator, tries: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Candidate images for the given labels; returns (images (B, s, s) uint8, placed (B,) bool).

    Like Linsley et al.'s generator, paths go in one at a time where they keep clear of the ink already
    drawn (Chebyshev distance > link), instead of being drawn blindly and rejected: for each path every
    clear translation is found at once (a grouped convolution of the path's mask with the dilated ink),
    and one is drawn uniformly. Batched over candidates; only the loop over paths is Python.
    """
    b = len(labels)
    margin = int(math.floor(p.marker_radius))
    pix, placed = _shapes(b, n_paths, length, p, rng, s - 2 * margin, tries)

    # markers belong to the path they sit on: path 0's start always; its end (positive) or path 1's start
    disc = _disc(p.marker_radius)
    first, last = pix[:, :, 0, :], pix[:, :, -1, :]
    pos = labels.astype(bool)[:, None, None]
    m0 = np.concatenate([first[:, 0, None] + disc, np.where(pos, last[:, 0, None] + disc, first[:, 0, None])], axis=1)
    m1 = np.where(pos, first[:, 1, None], first[:, 1, None] + disc)
    shapes = [np.concatenate([pix[:, 0], m0], axis=1), np.concatenate([pix[:, 1], m1], axis=1)]
    shapes += [pix[:, j] for j in range(2, n_paths)]

    ink = torch.zeros(b, s, s)
    rows = np.arange(b)[:, None]
    for shape in shapes:
        shape = shape - shape.min(axis=1, keepdims=True) + margin  # markers' room kept on all sides
        k = int(min(shape.max() + 1 + margin, s))
        shape = np.minimum(shape, k - 1)
        mask = np.zeros((b, k, k), dtype=np.float32)
        mask[rows, shape[..., 0], shape[..., 1]] = 1.0
        near = F.max_pool2d(ink.unsqueeze(1), 2 * p.link + 1, stride=1, padding=p.link)  # too close to ink
        near = F.pad(near, (0, k - 1, 0, k - 1), value=1.0)  # off the canvas counts as blocked
        hits = F.conv2d(near.view(1, b, s + k - 1, s + k - 1), torch.from_numpy(mask).unsqueeze(1), groups=b)[0]
        clear = hits < 0.5  # (b, s, s): translations (dy, dx) that keep the path clear and on the canvas
        placed &= clear.flatten(1).any(dim=1).numpy()
        score = torch.from_numpy(rng.random((b, s, s), dtype=np.float32)) * clear
        best = score.flatten(1).argmax(dim=1).numpy()
        yy = np.clip(shape[..., 0] + (best // s)[:, None], 0, s - 1)
        xx = np.clip(shape[..., 1] + (best % s)[:, None], 0, s - 1)
        ink[torch.from_numpy(np.broadcast_to(rows, yy.shape).ravel()), torch.from_numpy(yy.ravel()),
            torch.from_numpy(xx.ravel())] = 1.0
    return (ink.numpy() * 255).astype(np.uint8), placed


def _pair_by_distance(slots: np.ndarray, labels: np.ndarray, distance: np.ndarray,
                      rng: np.random.Generator, positives_open: bool) -> np.ndarray:
    """Which valid candidates to keep: positives and negatives in equal numbers per marker distance.

    A positive's markers are the two ends of one path, a negative's the starts of two paths, so left
    alone the markers' distance gives the label away (negatives sit farther apart). Keeping a positive
    only with a negative whose markers are as far apart makes the two classes' distance histograms
    equal, value for value (centroids of symmetric markers lie on the pixel lattice, so the distances
    take few exact values and need no binning): the distance then says nothing about the label. At most one candidate per
    slot; the odd negative of an odd `n` is the only one ever kept unpaired (once no positive is open).
    """
    order = rng.permutation(len(slots))
    bins = np.round(distance[order] ** 2, 1)  # the squared distance itself: a lattice value, no bin width
    used: set[int] = set()
    chosen: list[int] = []
    for b in rng.permutation(np.unique(bins)):
        in_bin = order[bins == b]
        pos, neg = [], []
        for i in in_bin:
            s = int(slots[i])
            if s not in used:
                (pos if labels[i] else neg).append(i)
                used.add(s)
        k = min(len(pos), len(neg))
        chosen += pos[:k] + neg[:k]
        for i in pos[k:] + neg[k:]:  # unpaired: free the slot for another bin
            used.discard(int(slots[i]))
    if not positives_open:  # only the odd negative is still open: nothing to pair it with
        first = {}
        for i in order:
            first.setdefault(int(slots[i]), i)
        chosen += [i for s, i in first.items() if s not in used]
    return np.asarray(chosen, dtype=np.int64)


def make_pathfinder(n: int, resolution: int = 32, contour_length: int = 14, seed: int = 0,
                    distractors: int | None = None) -> PathfinderData:
    """`n` Pathfinder images with balanced labels (module docstring), a pure function of its arguments.

    Exactly n // 2 positives (the odd one out is negative), in a seeded random order. `distractors`
    defaults to the resolution's `DRAW` value. Raises RuntimeError if the parameters are too tight to
    draw (e.g. very long contours at 16x16 with many distractors).
    """
    n = _check_int("n", n, 1)
    if isinstance(resolution, bool) or resolution not in DRAW:
        raise ValueError(f"resolution must be one of {sorted(DRAW)}, got {resolution!r}")
    length = _check_int("contour_length", contour_length, 2)
    seed = _check_int("seed", seed, 0)
    p = DRAW[resolution]
    n_distract = p.distractors if distractors is None else _check_int("distractors", distractors, 0)
    n_paths = 2 + n_distract

    rng = np.random.default_rng([seed, resolution, length, n_distract])
    labels = np.zeros(n, dtype=np.int64)
    labels[: n // 2] = 1
    rng.shuffle(labels)
    images = np.zeros((n, resolution, resolution), dtype=np.uint8)
    todo = np.arange(n)
    for _ in range(_MAX_ROUNDS):
        # oversample the open slots: acceptance is well below 1 for long contours at small sizes
        reps = max(1, min(8, 2 * n // max(len(todo), 1)))
        slots = np.repeat(todo, reps)
        cand, placed = _draw(labels[slots], resolution, length, n_paths, p, rng)
        keep = np.flatnonzero(placed)  # only placed candidates are worth checking
        n_comp, n_blobs, joined, distance = _analyse(torch.from_numpy(cand[keep]), p.link)
        ok = ((n_comp.numpy() == n_paths) & (n_blobs.numpy() == 2)
              & (joined.numpy() == labels[slots[keep]].astype(bool)))
        good = keep[ok]
        chosen = _pair_by_distance(slots[good], labels[slots[good]], distance.numpy()[ok], rng,
                                   positives_open=bool(labels[todo].any()))
        images[slots[good[chosen]]] = cand[good[chosen]]
        todo = np.setdiff1d(todo, slots[good[chosen]])
        if len(todo) == 0:
            return PathfinderData(torch.from_numpy(images), torch.from_numpy(labels))
    raise RuntimeError(f"make_pathfinder: could not draw {len(todo)} of {n} images at resolution={resolution}, "
                       f"contour_length={length}, distractors={n_distract}; use fewer distractors or shorter contours")


def plot_examples(data: PathfinderData, path: str | Path, per_class: int = 4) -> Path:
    """A PNG grid, one row per class (positive on top), of the first `per_class` images of each: for the report."""
    per_class = _check_int("per_class", per_class, 1)
    from matplotlib.figure import Figure  # no pyplot: a bare Figure saves through the Agg canvas

    labels = data.labels.numpy()
    rows = [(1, "connected"), (0, "not connected")]
    fig = Figure(figsize=(1.6 * per_class, 3.6))
    axes = fig.subplots(2, per_class, squeeze=False)
    for r, (cls, name) in enumerate(rows):
        idx = np.flatnonzero(labels == cls)[:per_class]
        for c in range(per_class):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(idx):
                ax.imshow(data.images[idx[c]].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if c == 0:
                ax.set_ylabel(name)
    h, w = data.images.shape[1:]
    fig.suptitle(f"Pathfinder {h}x{w}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
