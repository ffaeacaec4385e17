"""Resumable, deterministic, infinite sample streams (the base of every training data source).

Why a base class of our own: a training run must be interruptible and resumable so that the resumed
run sees exactly the batches the uninterrupted run would have seen. ``torch.utils.data.DataLoader``
workers prefetch ahead of the trainer, so only the *trainer* knows what was consumed. The contract:

* The stream is split into ``num_workers`` *roles* (1 when iterated in the main process). Each role
  owns a deterministic, infinite raw sequence (subclasses define it) and forms whole batches from it.
  Each batch carries ``batch["_state"]``: the role and the role's *pointer* just after the batch.
* The ``DataLoader`` (``batch_size=None``, any ``num_workers``, default in-order delivery) hands
  batch ``b`` from worker ``b % num_workers``; the trainer calls ``stream.observe(batch)`` for every
  batch it actually used. ``stream.state_dict()`` then describes exactly the consumed prefix.
* On resume, ``stream.load_state_dict(state)`` before ``iter(loader)``; worker ``w`` plays role
  ``(w + consumed_batches) % num_workers`` from that role's pointer, so the next batch is the one
  the uninterrupted run would have produced next.

Skipped samples (corrupt image, missing caption, ...) are never dropped silently: the worker logs a
warning (``logging`` logger ``mixreorg.data``) and each batch carries ``batch["_stats"]``, the
counts skipped while forming it (so skips after the last delivered batch are reported with the next
one); ``observe`` accumulates them into ``stream.stats`` and ``stream.stats_report()`` prints them.

Per-sample mode (``batch_size=None``) yields single samples with the same ``_state``/``_stats``
keys; it is exact when iterated in the main process (or with one worker). A ``DataLoader`` may still
batch such items (the keys collate), but its batches interleave workers and cannot be ``observe``d:
give the stream a ``batch_size`` for exact resume with workers.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

__all__ = [
    "ResumableStream",
    "collate_samples",
    "default_rank_world",
    "chunked_index",
    "role_share",
    "SKIP_REASONS",
]

logger = logging.getLogger("mixreorg.data")

#: Reasons a sample can be skipped; every skip is counted under one of these keys.
SKIP_REASONS = ("corrupt_image", "missing_image", "missing_caption", "corrupt_shard")

_MAX_EXAMPLES = 100  # offending keys remembered per stream (the counts are unbounded)


def default_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of ``torch.distributed`` when initialised, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate sample dicts into a batch dict.

    Tensors of equal shape are stacked (``image`` -> ``[B, 3, H, W]``, ``mask`` -> ``[B, H, W]``),
    tensors of unequal shape stay a list, numbers become a tensor, everything else (captions, noun
    lists, keys) becomes a list. Keys starting with ``_`` are not collated.
    """
    if not samples:
        raise ValueError("collate_samples: empty list of samples")
    out: dict[str, Any] = {}
    for key in samples[0]:
        if key.startswith("_"):
            continue
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            if all(isinstance(v, torch.Tensor) and v.shape == first.shape for v in values):
                out[key] = torch.stack(values)
            else:
                out[key] = values
        elif isinstance(first, (bool, int, float)) and not isinstance(first, np.ndarray):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class ResumableStream(IterableDataset):
    """Base class: an infinite, deterministic stream that resumes exactly (see module docstring).

    Subclasses implement :meth:`_role_items` (the role's raw sequence from a pointer) and
    :meth:`_fingerprint` (what must not change between a save and a resume). Pointers must be made
    of ints, lists and dicts only (they travel through ``torch.save(weights_only=True)``).
    """

    def __init__(
        self,
        batch_size: int | None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        d_rank, d_world = default_rank_world()
        self.rank = d_rank if rank is None else int(rank)
        self.world_size = d_world if world_size is None else int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank} world_size={self.world_size}")
        self.batch_size = batch_size
        self._consumed = 0  # batches (or samples in per-sample mode) the trainer observed
        self._num_roles: int | None = None
        self._pointers: list[Any] = []
        self._stats: Counter[str] = Counter()
        self._examples: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ subclass hooks
    def _role_items(self, role: int, num_roles: int, pointer: Any) -> Iterator[tuple[Any, Any, str]]:
        """Yield ``(pointer_after, sample_or_None, skip_reason_or_detail)`` forever from ``pointer``.

        ``sample`` is a dict (a usable sample); ``None`` marks a skipped item, and the third field is
        then ``"reason: detail"`` with ``reason`` one of :data:`SKIP_REASONS`.
        ``pointer=None`` means the start of the stream.
        """
        raise NotImplementedError

    def _role_batches(self, role: int, num_roles: int, pointer: Any) -> Iterator[tuple[Any, dict[str, Any]]] | None:
        """Optional fast path for sources without skips: yield ``(pointer_after, batch)`` forever, or
        return ``None`` to use :meth:`_role_items` (the batch must equal the collated samples)."""
        return None

    def _fingerprint(self) -> dict[str, Any]:
        """Plain values that must be equal between the saved stream and the resuming one."""
        return {}

    def _translate_pointers(self, consumed: int, old_roles: int, new_roles: int) -> list[Any]:
        """Role pointers for ``new_roles`` workers after ``consumed`` batches saved with ``old_roles``.

        The default cannot do it (skips make the role sequences depend on the worker count).
        """
        raise ValueError(
            f"{type(self).__name__}: the saved position was taken with num_workers={old_roles} "
            f"(counting the main process as 1); resume with the same number of DataLoader workers "
            f"(now {new_roles}), or call reset_position() to start this data stream over"
        )

    @property
    def _unit(self) -> int:
        """Samples per observed unit (a batch, or one sample in per-sample mode)."""
        return self.batch_size or 1

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_roles = info.num_workers if info is not None else 1
        worker = info.id if info is not None else 0
        pointers = self._pointers
        if self._num_roles is not None and self._num_roles != num_roles and self._consumed > 0:
            pointers = self._translate_pointers(self._consumed, self._num_roles, num_roles)
        role = (worker + self._consumed) % num_roles
        pointer = pointers[role] if role < len(pointers) else None
        if self.batch_size is not None:
            fast = self._role_batches(role, num_roles, pointer)
            if fast is not None:
                for after, batch in fast:
                    batch["_state"] = {"role": role, "num_roles": num_roles, "pointer": after}
                    batch["_stats"] = self._full_stats(Counter(samples=self.batch_size))
                    batch["_skipped"] = ""
                    yield batch
                return
        delta: Counter[str] = Counter()
        examples: list[tuple[str, str]] = []
        buffer: list[dict[str, Any]] = []
        n_warned = 0
        for after, sample, note in self._role_items(role, num_roles, pointer):
            if sample is None:
                reason, _, detail = note.partition(": ")
                delta[reason] += 1
                if len(examples) < 10:
                    examples.append((reason, " ".join(detail.split())))
                n_warned += 1
                if n_warned <= 20 or n_warned % 1000 == 0:
                    logger.warning("%s: skipped sample (%s): %s", type(self).__name__, reason, detail)
                continue
            delta["samples"] += 1
            if self.batch_size is None:
                sample["_state"] = {"role": role, "num_roles": num_roles, "pointer": after}
                sample["_stats"] = self._full_stats(delta)
                sample["_skipped"] = "\n".join(f"{r}: {d}" for r, d in examples)
                delta, examples = Counter(), []
                yield sample
                continue
            buffer.append(sample)
            if len(buffer) == self.batch_size:
                batch = collate_samples(buffer)
                batch["_state"] = {"role": role, "num_roles": num_roles, "pointer": after}
                batch["_stats"] = self._full_stats(delta)
                batch["_skipped"] = "\n".join(f"{r}: {d}" for r, d in examples)
                buffer, delta, examples = [], Counter(), []
                yield batch

    @staticmethod
    def _full_stats(delta: Counter[str]) -> dict[str, int]:
        # the same keys on every item, so that a DataLoader can still collate per-sample items
        out = {"samples": int(delta["samples"]), **{r: int(delta[r]) for r in SKIP_REASONS}}
        out.update({k: int(v) for k, v in delta.items()})  # a subclass's own reasons are never dropped
        return out

    # ------------------------------------------------------------------ position bookkeeping
    def observe(self, batch: dict[str, Any]) -> None:
        """Record that the trainer consumed ``batch`` (call once per batch, in delivery order)."""
        try:
            state = batch["_state"]
        except (KeyError, TypeError):
            raise ValueError(
                f"{type(self).__name__}.observe: the batch has no '_state' entry; pass the batch exactly "
                "as this stream yielded it (use DataLoader(batch_size=None, ...) so it is not re-collated)"
            ) from None
        if isinstance(state.get("role"), torch.Tensor):
            raise ValueError(
                f"{type(self).__name__}.observe: this batch was collated by the DataLoader from per-sample items; "
                "give the stream a batch_size and use DataLoader(batch_size=None) to resume exactly"
            )
        role, num_roles = int(state["role"]), int(state["num_roles"])
        if self._num_roles != num_roles:
            if self._num_roles is not None and self._consumed > 0:
                self._pointers = self._translate_pointers(self._consumed, self._num_roles, num_roles)
            self._num_roles = num_roles
        if len(self._pointers) < num_roles:
            self._pointers = list(self._pointers) + [None] * (num_roles - len(self._pointers))
        self._pointers[role] = state["pointer"]
        self._consumed += 1
        for key, value in batch.get("_stats", {}).items():
            self._stats[key] += int(value)
        for line in str(batch.get("_skipped", "")).splitlines():
            if len(self._examples) < _MAX_EXAMPLES:
                reason, _, detail = line.partition(": ")
                self._examples.append((reason, detail))

    @property
    def consumed(self) -> int:
        """Batches (per-sample mode: samples) observed since the start of the stream."""
        return self._consumed

    @property
    def stats(self) -> dict[str, int]:
        """Counts over the observed prefix: ``samples`` delivered and every skip reason."""
        out = {"samples": 0, **{reason: 0 for reason in SKIP_REASONS}}
        out.update(self._stats)
        return out

    @property
    def skipped_examples(self) -> list[tuple[str, str]]:
        """Up to 100 ``(reason, detail)`` pairs of skipped samples, in the order they were seen."""
        return list(self._examples)

    def stats_report(self) -> str:
        """One line: samples delivered and every non-zero skip count (for logs and run reports)."""
        stats = self.stats
        skipped = {k: v for k, v in stats.items() if k != "samples" and v}
        text = f"{type(self).__name__}: {stats['samples']} samples delivered"
        if skipped:
            text += ", skipped " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items())
        else:
            text += ", none skipped"
        return text

    def reset_position(self) -> None:
        """Forget the position: the next iteration starts the stream from the beginning."""
        self._consumed = 0
        self._num_roles = None
        self._pointers = []

    def state_dict(self) -> dict[str, Any]:
        """The consumed position as plain values (safe for ``torch.save(weights_only=True)``)."""
        return {
            "kind": type(self).__name__,
            "fingerprint": self._fingerprint(),
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "consumed": self._consumed,
            "num_roles": self._num_roles,
            "pointers": list(self._pointers),
            "stats": dict(self._stats),
            "examples": [list(e) for e in self._examples],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; raises ``ValueError`` on any mismatch."""
        expected = {
            "kind": type(self).__name__,
            "fingerprint": self._fingerprint(),
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
        }
        diffs = [
            f"{key}: saved {state.get(key)!r}, now {value!r}"
            for key, value in expected.items()
            if state.get(key) != value
        ]
        if diffs:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the saved data position belongs to a different "
                "stream; mismatches:\n  " + "\n  ".join(diffs)
            )
        self._consumed = int(state["consumed"])
        self._num_roles = state["num_roles"]
        self._pointers = list(state["pointers"])
        self._stats = Counter({k: int(v) for k, v in state.get("stats", {}).items()})
        self._examples = [(str(a), str(b)) for a, b in state.get("examples", [])]


def chunked_index(pointer: int, role: int, num_roles: int, rank: int, world_size: int, chunk: int) -> int:
    """Global raw index of item ``pointer`` of a role's subsequence (index-addressable sources).

    The global raw sequence ``0, 1, 2, ...`` is cut into chunks of ``chunk`` items; chunk ``c`` goes
    to rank ``c % world_size``; a rank's chunks go round-robin to its roles. With ``chunk`` equal to
    the batch size and no skips, batch ``b`` of a rank is exactly its ``b``-th chunk whatever the
    number of workers.
    """
    local_chunk, within = divmod(pointer, chunk)
    rank_chunk = local_chunk * num_roles + role
    global_chunk = rank_chunk * world_size + rank
    return global_chunk * chunk + within


def role_share(consumed: int, role: int, num_roles: int) -> int:
    """How many of the first ``consumed`` round-robin units went to ``role``."""
    if role >= consumed:
        return 0
    return (consumed - role + num_roles - 1) // num_roles
