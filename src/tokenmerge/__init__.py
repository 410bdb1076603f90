"""tokenmerge: training-free token merging for diffusers pipelines.

>>> import tokenmerge as tm
>>> tm.apply(pipe, tm.ToMA(ratio=0.5))
>>> tm.remove(pipe)
"""

from tokenmerge.methods.base import Method
from tokenmerge.methods.catome import CAToMe
from tokenmerge.methods.todo import ToDo
from tokenmerge.methods.toma import ToMA
from tokenmerge.methods.tomesd import ToMeSD
from tokenmerge.patch import apply, remove, reset, set_step

__all__ = ["CAToMe", "Method", "ToDo", "ToMA", "ToMeSD", "apply", "remove", "reset", "set_step"]
__version__ = "0.1.0"
