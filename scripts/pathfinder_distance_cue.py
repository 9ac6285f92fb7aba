"""How much does the markers' distance alone say about a Pathfinder label? A faithful generator gives ~0.5.

`python scripts/pathfinder_distance_cue.py RESOLUTION CONTOUR_LENGTH`: the best threshold rule on the
distance between the two markers, fitted on 1,000 images and scored on 1,000 others.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tasks.pathfinder_data import INK_THRESHOLD, _components, make_pathfinder  # noqa: E402


def marker_dist(images):
    b, h, w = images.shape
    ink = images > INK_THRESHOLD
    inkf = F.pad(ink.float().unsqueeze(1), (1, 1, 1, 1), value=0.0)
    core = ((-F.max_pool2d(-inkf, 3, stride=1)).squeeze(1) > 0.5) & ink
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w)
    blob = _components(core, 1)
    roots = torch.nonzero(core & (blob == ids)).view(-1, 2, 3)
    return (roots[:, 0, 1:] - roots[:, 1, 1:]).float().norm(dim=-1)

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
