"""How much does the markers' distance alone say about a Pathfinder label? A faithful generator gives ~0.5.

`python scripts/pathfinder_distance_cue.py RESOLUTION CONTOUR_LENGTH`: the best threshold rule on the
distance between the two markers, fitted on 1,000 images and scored on 1,000 others.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tasks.pathfinder_data import DRAW, _analyse, make_pathfinder  # noqa: E402


def marker_dist(images: torch.Tensor) -> torch.Tensor:
    return _analyse(images, DRAW[images.shape[1]].link)[3]

res, length = int(sys.argv[1]), int(sys.argv[2])
tr, te = make_pathfinder(1000, res, length, 1), make_pathfinder(1000, res, length, 2)
dtr, dte = marker_dist(tr.images), marker_dist(te.images)


def rule_accuracy(d: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, above: bool) -> float:
    predicted = d > t if above else d < t
    return (predicted == labels.bool()).float().mean().item()


candidates = [(t, above) for t in dtr.unique() for above in (True, False)]
t, above = max(candidates, key=lambda c: rule_accuracy(dtr, tr.labels, *c))
acc = rule_accuracy(dte, te.labels, t, above)
print(f"res {res} contour {length}: marker distance pos mean {dte[te.labels == 1].mean():.1f} "
      f"neg {dte[te.labels == 0].mean():.1f}; best threshold rule held-out accuracy {acc:.3f}")
