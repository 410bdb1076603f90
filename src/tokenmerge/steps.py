"""Which denoising step a denoiser call belongs to, and where a generation starts: pure Python, no hooks."""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch

from tokenmerge.methods.base import Method


class Change(Enum):
    """What a denoiser call changes: nothing, the step, or the generation (caches start empty)."""

    NONE = 0
    STEP = 1
    GENERATION = 2


class StepTracker:
    """The step of every denoiser call, the method's ``active`` flag and ``phase`` for it.

    Driven (a pipeline's scheduler between ``set_timesteps`` and its last ``step``, or ``tm.set_step``): the step is
    set before the call and no timestep is read (no device sync: compiled models see only Python constants); a new
    input shape starts a new generation at the same step. Otherwise the step advances on a new timestep value, and a
    reset, a new input shape (batch size or resolution) or a rising timestep start a new generation; repeated calls
    at one timestep (separate guidance passes) share a step.
    """

    def __init__(self, method: Method) -> None:
        self.method = method
        self.step_of_index: list[int] = []  # step of each index into the scheduler's timesteps
        self.num_steps: int | None = None  # steps of the scheduler's last set_timesteps (None: not scheduled)
        self.reset()

    def reset(self) -> None:
        """Undriven, and the next call starts a new generation."""
        self.new_generation = True
        self.driven = False
        self.key: tuple[int, ...] | None = None
        self.timestep = 0.0
        self.run_steps: int | None = None  # steps this generation runs
        self.first_index = self.index = 0
        self.enter(0)

    def enter(self, step: int) -> None:
        self.step = step
        self.active = self.method.active(step)
        self.phase = self.method.phase(step, self.run_steps)

    def schedule(self, timesteps: torch.Tensor | None, can_step: bool) -> None:
        """The scheduler set ``timesteps``: a new generation, driven by its ``step`` calls if ``can_step``."""
        if timesteps is not None and timesteps.numel():
            new = torch.ones(timesteps.numel(), dtype=torch.long)
            new[1:] = (timesteps[1:] != timesteps[:-1]).cpu()
            self.step_of_index = (new.cumsum(0) - 1).tolist()  # repeated timesteps (Heun) share a step
            self.num_steps = self.step_of_index[-1] + 1
        else:
            self.step_of_index, self.num_steps = [], None
        self.reset()
        self.driven = bool(self.step_of_index) and can_step

    def stepped(self, step_index: int | None) -> bool:
        """The scheduler took a step: the next calls belong to the step of its next timestep (its ``step_index``, or
        one more than before). Returns whether the calls that follow enter a step (every cached plan stale, even at a
        repeated timestep); past the last timestep the tracker is reset."""
        if not self.driven:
            return False
        self.index = step_index if step_index is not None else self.index + 1
        if self.index >= len(self.step_of_index):
            self.reset()
            return False
        self.enter(self.step_of_index[self.index] - self.step_of_index[self.first_index])
        return True

    def drive(self, step: int) -> None:
        """``tm.set_step``: the following calls belong to ``step`` (0: a new generation)."""
        if step == 0:
            self.reset()
        self.driven = True
        self.enter(step)

    def begin_call(self, key: tuple[int, ...], timestep: Any) -> Change:
        """A denoiser call of input shape ``key`` at ``timestep`` (read only when not driven)."""
        if self.driven:
            return Change.GENERATION if self.new_generation or key != self.key else Change.NONE
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        change = Change.NONE
        if self.new_generation or key != self.key or t > self.timestep:
            change = Change.GENERATION
            self.enter(0)
        elif t != self.timestep:
            change = Change.STEP
            self.enter(self.step + 1)
        self.timestep = t
        return change

    def start_generation(self, key: tuple[int, ...], begin_index: int | None, order: int) -> None:
        """Calls of shape ``key`` start a generation; ``begin_index``: the scheduler's first timestep index (img2img
        ``strength`` skips the steps before it), ``order`` its timesteps per step."""
        self.key, self.new_generation = key, False
        self.first_index = self.index = begin_index or 0
        self.run_steps = self.num_steps
        if self.num_steps is not None and begin_index is not None:
            self.run_steps = max(1, self.num_steps - begin_index // order)
        self.enter(self.step)
