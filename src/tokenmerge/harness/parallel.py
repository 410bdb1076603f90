"""Context-parallel runs for tests and benchmarks: ranks as local processes, bytes counted at the collectives.

- :func:`run_ranks` runs a function on ``world`` local processes joined in a gloo process group and returns what
  every rank returned.
- :class:`CollectiveBytes` counts, per rank, the payload that the collectives diffusers' context parallelism calls
  (``torch.distributed`` and its functional collectives) deliver to other ranks, split into those of the attention
  (Ulysses all-to-all, ring all-gather, inside diffusers' templated context-parallel attention) and the rest (the
  output gather, size exchanges).
- :func:`cpu_stand_ins`: what diffusers' context parallelism lacks on a CPU, for tests and CPU benchmarks only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp


@dataclass
class CollectiveBytes:
    """Bytes this rank's tensors deliver to other ranks through collectives while active (a context manager), by
    where they were called: ``attention`` (diffusers' context-parallel attention) or ``other``.

    All-to-all: the chunks addressed to other ranks (equal chunks unless split sizes are given); all-gather: the
    rank's tensor, once to each other rank. Counted at the call, whatever algorithm the backend then runs.
    """

    attention: int = 0
    other: int = 0
    _depth: int = field(default=0, repr=False)
    _stack: ExitStack | None = field(default=None, repr=False)

    def __enter__(self) -> CollectiveBytes:
        from diffusers.models import attention_dispatch

        stack = ExitStack()
        stack.enter_context(mock.patch.object(funcol, "all_to_all_single", self._all_to_all(funcol.all_to_all_single)))
        stack.enter_context(mock.patch.object(funcol, "all_gather_tensor", self._gather(funcol.all_gather_tensor, 0)))
        stack.enter_context(mock.patch.object(dist, "all_gather", self._gather(dist.all_gather, 1)))
        templated = attention_dispatch._templated_context_parallel_attention
        stack.enter_context(mock.patch.object(attention_dispatch, templated.__name__, self._inside(templated)))
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _add(self, n: int) -> None:
        if self._depth:
            self.attention += n
        else:
            self.other += n

    def _inside(self, fn: Callable) -> Callable:
        def attention(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return attention

    def _all_to_all(self, fn: Callable) -> Callable:
        def all_to_all(x: torch.Tensor, output_split_sizes: Any, input_split_sizes: Any, group: Any) -> Any:
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            row = x[0].numel() * x.element_size() if x.ndim else x.element_size()
            splits = input_split_sizes or [x.shape[0] // world] * world
            self._add(sum(s for r, s in enumerate(splits) if r != rank) * row)
            return fn(x, output_split_sizes, input_split_sizes, group)

        return all_to_all

    def _gather(self, fn: Callable, tensor_arg: int) -> Callable:
        def gather(*args: Any, **kwargs: Any) -> Any:
            x, group = args[tensor_arg], kwargs.get("group", args[2] if len(args) > 2 else None)
            self._add(x.numel() * x.element_size() * (dist.get_world_size(group) - 1))
            return fn(*args, **kwargs)

        return gather


def _lse_attention_op(native: Callable) -> Callable:
    """diffusers' native attention forward op, with the log-sum-exp of the scores that ring attention asks for
    (``return_lse=True``, which the native op refuses): plain float32 math on ``(B, S, H, D)`` queries, keys and
    values, returning ``out`` ``(B, S, H, D)`` and ``lse`` ``(B, S, H)``."""

    def forward_op(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
        _save_ctx: bool = True,
        _parallel_config: Any = None,
    ) -> Any:
        if not return_lse:
            options = (attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, _save_ctx, _parallel_config)
            return native(ctx, query, key, value, *options)
        if dropout_p or is_causal or enable_gqa:
            raise ValueError("the CPU log-sum-exp stand-in computes plain attention only")
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        scores = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        if attn_mask is not None:
            scores = scores + attn_mask
        out = torch.softmax(scores, -1) @ v
        return out.transpose(1, 2).to(query.dtype), scores.logsumexp(-1).transpose(1, 2)

    return forward_op


@contextmanager
def cpu_stand_ins() -> Iterator[None]:
    """For context-parallel tests and benchmarks on a CPU only: ``torch.accelerator.device_count()`` at least 1
    (diffusers' ``enable_parallelism`` takes the rank modulo it, 0 on a CPU) and a native attention op that returns
    the log-sum-exp ring attention needs (diffusers' refuses: "Native attention does not support return_lse=True")."""
    from diffusers.models import attention_dispatch

    count = torch.accelerator.device_count
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.accelerator, "device_count", lambda: max(1, count())))
        native = attention_dispatch._native_attention_forward_op
        stack.enter_context(mock.patch.object(attention_dispatch, native.__name__, _lse_attention_op(native)))
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, queue: Any, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with cpu_stand_ins():
            queue.put((rank, fn(rank, world, *args)))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned local processes in one gloo process group (one thread each,
    :func:`cpu_stand_ins` active); returns what each rank returned (picklable values), in rank order. An exception in
    a rank is raised here with its traceback (``torch.multiprocessing.ProcessRaisedException``)."""
    queue = mp.get_context("spawn").SimpleQueue()
    ranks = mp.start_processes(
        _rank_main, args=(world, _free_port(), queue, fn, args), nprocs=world, join=False, start_method="spawn"
    )
    results: dict[int, Any] = {}
    done = False
    while not done:
        done = ranks.join(timeout=0.05)  # raises if a rank failed
        while not queue.empty():  # drained while the ranks run: a full pipe would block their put
            rank, result = queue.get()
            results[rank] = result
    return [results[r] for r in range(world)]
