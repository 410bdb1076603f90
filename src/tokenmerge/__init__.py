"""tokenmerge: training-free token merging for diffusers pipelines.

>>> import tokenmerge as tm
>>> tm.apply(pipe, tm.ToMA(ratio=0.5))
>>> print(tm.summary(pipe))
>>> tm.remove(pipe)
"""

import logging

from tokenmerge.api import applied, apply, is_applied, remove, reset, set_step, summary
from tokenmerge.methods.base import Method
from tokenmerge.methods.catome import CAToMe
from tokenmerge.methods.todo import ToDo
from tokenmerge.methods.toma import ToMA
from tokenmerge.methods.tomesd import ToMeSD
from tokenmerge.summary import Summary

logging.getLogger("tokenmerge").addHandler(logging.NullHandler())

#: Names loaded on first use from the harness (they need the ``harness`` extra): name -> module.
_LAZY = {"tune": "tokenmerge.harness.tune", "load_tuned": "tokenmerge.harness.tune_cache"}
#: Packages of the harness extra that those import only when they run (checked before they are loaded).
_LAZY_NEEDS = ("torchmetrics", "tqdm")


def __getattr__(name: str) -> object:
    """``tm.tune`` / ``tm.load_tuned``: imported on first use; without the harness extra, one line saying so."""
    if name not in _LAZY:
        raise AttributeError(f"module 'tokenmerge' has no attribute {name!r}")
    import importlib
    import importlib.util

    def missing_extra(missing: str) -> ImportError:
        return ImportError(
            f'tokenmerge.{name} needs the harness extra ({missing} missing): pip install "tokenmerge[harness]"'
        )

    absent = [m for m in _LAZY_NEEDS if importlib.util.find_spec(m) is None]
    if absent:
        raise missing_extra(", ".join(absent))
    try:
        module = importlib.import_module(_LAZY[name])
    except ModuleNotFoundError as exc:
        missing = (exc.name or "a harness package").partition(".")[0]
        if missing == "tokenmerge":
            raise
        raise missing_extra(missing) from None
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
