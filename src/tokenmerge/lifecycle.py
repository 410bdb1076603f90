"""Where a pipeline call starts and ends, and which steps it runs: wrappers on the pipeline and its scheduler.

``apply`` on a pipeline replaces, as instance attributes that ``remove`` deletes:

- ``scheduler.set_timesteps``: a new generation, with the step of every timestep index (repeated timesteps, e.g.
  Heun's, share a step);
- ``scheduler.step``: the next step;
- ``pipeline.progress_bar``: diffusers pipelines run their denoising loop inside ``with self.progress_bar(...)`` or
  ``for t in self.progress_bar(timesteps)``; the bar it returns reports the loop's start and its end, however it ends
  (last step, ``pipe._interrupt``, an exception or ``KeyboardInterrupt``, SDXL's ``denoising_end``).

At the loop's start the pipeline's current scheduler is followed (wrapped anew if ``pipe.scheduler`` was replaced);
at its end every cached plan is dropped and the step tracking reset. The wrappers are objects, not closures, so that
``copy.deepcopy`` of a patched pipeline gives a copy whose wrappers drive the copy.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Listener(Protocol):
    """What the link reports to (the patch)."""

    def scheduled(self, timesteps: torch.Tensor | None, can_step: bool) -> None: ...

    def stepped(self, step_index: int | None) -> None: ...

    def loop_started(self) -> None: ...

    def loop_ended(self) -> None: ...


class Wrapped:
    """Replaces a bound method as an instance attribute: calls the original, then ``after()``. ``__wrapped__`` keeps
    the original's signature visible (diffusers inspects ``set_timesteps``'s parameters)."""

    def __init__(self, original: Any, after: Any) -> None:
        self.__wrapped__ = original
        self.after = after

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.__wrapped__(*args, **kwargs)
        self.after()
        return result


class ProgressBar:
    """Replaces ``pipeline.progress_bar``: the loop starts when a bar is made; the bar reports its end."""

    def __init__(self, original: Any, link: PipelineLink) -> None:
        self.__wrapped__ = original
        self.link = link

    def __call__(self, *args: Any, **kwargs: Any) -> TrackedBar:
        bar = TrackedBar(self.__wrapped__(*args, **kwargs), self.link)
        self.link.loop_started(bar)
        return bar


class TrackedBar:
    """A progress bar (tqdm) that tells ``link`` when it ends: on ``__exit__``, when its iteration stops (however it
    stops: a generator's ``finally`` runs when the loop is left by an exception too) or on ``close``."""

    def __init__(self, bar: Any, link: PipelineLink) -> None:
        self._bar, self._link = bar, link

    def __enter__(self) -> TrackedBar:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._bar.__exit__(*exc)
        finally:
            self._link.loop_ended(self)

    def __iter__(self) -> Any:
        try:
            yield from self._bar
        finally:
            self._link.loop_ended(self)

    def __len__(self) -> int:
        return len(self._bar)

    def close(self) -> None:
        try:
            self._bar.close()
        finally:
            self._link.loop_ended(self)

    def __getattr__(self, name: str) -> Any:
        if name in ("_bar", "_link"):  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self._bar, name)


class PipelineLink:
    """The wrappers ``apply`` installed on one pipeline and its scheduler, reporting to ``listener``."""

    def __init__(self, pipeline: Any, listener: Listener) -> None:
        self.pipeline = pipeline
        self.listener = listener
        self.scheduler: Any = None
        self.bar: TrackedBar | None = None  # the loop running now
        if callable(getattr(pipeline, "progress_bar", None)):
            pipeline.progress_bar = ProgressBar(pipeline.progress_bar, self)
        self.follow()

    def follow(self) -> bool:
        """Wrap the pipeline's current scheduler if it is not the one wrapped (unwrapping that one); True if so."""
        current = getattr(self.pipeline, "scheduler", None)
        if current is self.scheduler:
            return False
        self._unwrap_scheduler()
        self.scheduler = current
        if callable(getattr(current, "set_timesteps", None)):
            current.set_timesteps = Wrapped(current.set_timesteps, self.timesteps_set)
            if callable(getattr(current, "step", None)):
                current.step = Wrapped(current.step, self.stepped)
        return True

    def timesteps_set(self) -> None:
        timesteps = getattr(self.scheduler, "timesteps", None)
        can_step = isinstance(vars(self.scheduler).get("step"), Wrapped)
        self.listener.scheduled(timesteps if isinstance(timesteps, torch.Tensor) else None, can_step)

    def stepped(self) -> None:
        index = getattr(self.scheduler, "step_index", None)
        self.listener.stepped(index if isinstance(index, int) else None)

    def loop_started(self, bar: TrackedBar) -> None:
        self.bar = bar
        if self.follow():  # pipe.scheduler was replaced: its timesteps are already set
            self.timesteps_set()
        self.listener.loop_started()

    def loop_ended(self, bar: TrackedBar) -> None:
        if bar is self.bar:
            self.bar = None
            self.listener.loop_ended()

    def begin_index(self) -> int | None:
        """The scheduler's first timestep index of this generation (img2img ``strength``), if it sets one."""
        begin = getattr(self.scheduler, "begin_index", None)
        return begin if isinstance(begin, int) else None

    def order(self) -> int:
        return max(1, int(getattr(self.scheduler, "order", 1)))

    def uninstall(self) -> None:
        self._unwrap_scheduler()
        if _mine(self.pipeline, "progress_bar", self):
            delattr(self.pipeline, "progress_bar")
        self.scheduler = self.bar = None

    def _unwrap_scheduler(self) -> None:
        for name in ("set_timesteps", "step"):
            if self.scheduler is not None and _mine(self.scheduler, name, self):
                delattr(self.scheduler, name)


def _mine(obj: Any, name: str, link: PipelineLink) -> bool:
    """Whether ``obj.name`` is an instance attribute that ``link`` installed."""
    attr = vars(obj).get(name)
    if isinstance(attr, Wrapped):
        return getattr(attr.after, "__self__", None) is link
    return isinstance(attr, ProgressBar) and attr.link is link
