"""tokenmerge: training-free token merging for diffusers pipelines.

>>> import tokenmerge as tm
>>> tm.apply(pipe, tm.ToMA(ratio=0.5))
>>> print(tm.summary(pipe))
>>> tm.remove(pipe)
"""

import logging

from tokenmerge.methods.base import Method
from tokenmerge.methods.catome import CAToMe
from tokenmerge.methods.todo import ToDo
from tokenmerge.methods.toma import ToMA
from tokenmerge.methods.tomesd import ToMeSD
from tokenmerge.patch import applied, apply, is_applied, remove, reset, set_step, summary
from tokenmerge.summary import Summary

logging.getLogger("tokenmerge").addHandler(logging.NullHandler())

__all__ = [
    "CAToMe",
    "Method",
    "Summary",
    "ToDo",
    "ToMA",
    "ToMeSD",
    "applied",
    "apply",
    "is_applied",
    "remove",
    "reset",
    "set_step",
    "summary",
]
__version__ = "0.1.0"
