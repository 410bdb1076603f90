"""Redundancy analysis: observe a pipeline's blocks without merging, measure how similar tokens are and how stable
merge decisions are across steps and blocks, and derive recomputation schedules from it (``tokenmerge analyze``).

>>> from tokenmerge.analysis import analyze, derive
>>> stats = analyze(pipe, ["a lighthouse at dawn"], seeds=[0, 1], steps=20)
>>> derive(stats, tolerance=0.2)["catome"]["schedule"]
"""

from tokenmerge.analysis.observe import Observe, Recorder, summarize
from tokenmerge.analysis.run import analyze, derive, observer_for, reference_call, write_report
from tokenmerge.analysis.schedules import catome_schedule, toma_intervals

__all__ = [
    "Observe",
    "Recorder",
    "analyze",
    "catome_schedule",
    "derive",
    "observer_for",
    "reference_call",
    "summarize",
    "toma_intervals",
    "write_report",
]
