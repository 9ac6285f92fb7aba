"""Named presets of a trained task: `conf/task/<task>.yaml` holds `presets:`, `preset` picks one.

A trained task's settings (model, data, steps) come as a bundle with a source
(LRA's code, nanoGPT's config), so the YAML names bundles instead of asking
for twenty keys. A key given as well (`task.lr=...`, or a non-null value in
the YAML) overrides the preset's value. The resolved values, not the preset's
name alone, go into the point, so the cell id changes when a preset is edited.
"""

from __future__ import annotations

from collections.abc import Iterable


def resolve_preset(task: str, point: dict, keys: Iterable[str]) -> dict:
    """`point` with its preset's values filled in wherever the point has None; `presets` itself removed.

    Raises ValueError (one line) for an unknown preset, naming the choices, and for a key in `keys` that
    neither the point nor the preset sets.
    """
    point = dict(point)
    presets = point.pop("presets", None) or {}
    preset = point.get("preset")
    if preset not in presets:
        raise ValueError(f"{task}: unknown preset {preset!r}; choose from: {', '.join(presets) or 'none'}")
    for key, value in presets[preset].items():
        if point.get(key) is None:
            point[key] = value
    missing = [k for k in keys if k not in point and k != "presets"]
    if missing:
        raise ValueError(f"{task}: preset {preset} lacks {', '.join(missing)} (conf/task/{task}.yaml)")
    return point


def check_ints(task: str, point: dict, keys: Iterable[str], low: int = 1, zero_ok: Iterable[str] = ()) -> None:
    """Raise ValueError (one line) unless each key holds an int >= low (>= 0 for the keys in zero_ok)."""
    zero_ok = set(zero_ok)
    for key in keys:
        floor = 0 if key in zero_ok else low
        if isinstance(point[key], bool) or not isinstance(point[key], int) or point[key] < floor:
            raise ValueError(f"{task}: {key} must be an int >= {floor}, got {point[key]!r}")
