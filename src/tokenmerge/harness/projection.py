"""Projected speed-fidelity fronts: a sweep's settings at their exact FLOP ratios on a real-size architecture.

The fidelity of a setting is measured on the swept model (a reference model, say); its cost is counted on a
real-size architecture's weightless twin (:mod:`tokenmerge.cost`), where the setting is made concrete for that
architecture (:attr:`~tokenmerge.harness.sweep.MethodSetting.projected`). The FLOP ratio of a setting is the
unaccelerated generation's FLOPs over the setting's, over the sweep's step count; content-adaptive methods (CA-ToMe)
are counted at the fraction they merged on the swept model. Step caches are not counted (their skips depend on the
content): their settings get no ratio and take no part in a projected front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tokenmerge.cost import CostSpec
from tokenmerge.harness.pareto import Point


def project(points: Sequence[Point], specs: Sequence[CostSpec], steps: int) -> None:
    """Fill every point's ``flop_ratios[spec.label]`` (NaN where the setting has no concrete form there)."""
    for spec in specs:
        twin, shape = spec.twin(), spec.shape()
        full = sum(twin.generation(None, shape, steps))
        for point in points:
            ratio = math.nan
            if point.label == "baseline":
                ratio = 1.0
            method = getattr(point.setting, "projected", {}).get(spec.label)
            if method is not None:
                fraction = point.merged_fraction if method.content_adaptive else None
                if not method.content_adaptive or fraction is not None:
                    rounded = None if fraction is None else round(fraction, 3)
                    ratio = full / sum(twin.generation(method, shape, steps, rounded))
            point.flop_ratios[spec.label] = ratio
