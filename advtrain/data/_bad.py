"""Bad samples: the record a reader makes when it skips one, and the budget that stops a run with too many.

Readers (in DataLoader workers) never raise on a bad sample: they skip it and attach a :class:`BadSample` to the
next sample they yield; the collate function gathers them into the batch, so the main process sees every record
exactly once whatever the worker count. :class:`BadSampleBudget` counts them, logs them with shard and sample key,
reports the counts for the metrics log, and raises :class:`BadSampleError` naming the worst shards when they
exceed a fraction of the samples read.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Literal, NamedTuple

BadKind = Literal["decode", "label", "caption", "image", "read", "truncated", "empty", "manifest"]

log = logging.getLogger("advtrain.data")


class BadSample(NamedTuple):
    """One skipped sample (or shard-level problem), as a reader reports it.

    Kinds: ``decode`` (the image bytes do not decode), ``label`` (no label, or not an int in range), ``caption``
    (no caption in text mode, or not UTF-8), ``image`` (no image member), ``read`` (a file of a class folder
    cannot be read), ``truncated`` (a shard ends early or is corrupt: the samples after ``key`` are lost),
    ``empty`` (a shard holds no sample), ``manifest`` (a shard holds a different number of samples than its
    manifest says).
    """

    kind: BadKind
    url: str  # the shard, file or source the sample comes from
    key: str  # the sample's key ("" for a shard-level record)
    message: str  # what went wrong, with the offending value
    lost: int = 1  # samples lost (a shard-level record: known missing samples, else 1)


class BadSampleError(RuntimeError):
    """Too many bad samples: the message names the counts per kind and the worst shards."""


class BadSampleBudget:
    """Counts bad-sample records, logs them, reports them, and stops the run past ``max_fraction`` of the reads.

    After each batch call ``update(batch.bad, good=len(batch.keys))``. The run stops when
    ``lost / (good + lost) > max_fraction`` once at least ``min_samples`` samples have been read (before that,
    one bad sample in the first ten would already be 10%). ``metrics()`` gives flat counts for a metrics line;
    ``state_dict()`` / ``load_state_dict()`` carry the counts across a resume. Under DDP each rank counts its own
    reads; sum the ranks' ``metrics()`` for the global figure.

    Args:
        max_fraction: the budget as a fraction of samples read (default 0.001 = 0.1%); 1 disables the error.
        min_samples: the budget is enforced only after this many samples (good + lost).
        log_first: log the first this many records one by one (warning level), then one line per power of ten.
        worst: how many shards the error names.
    """

    def __init__(self, *, max_fraction: float = 0.001, min_samples: int = 1000, log_first: int = 100, worst: int = 5):
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_fraction must be in [0, 1]; got {max_fraction}")
        if min_samples < 0 or log_first < 0 or worst < 1:
            raise ValueError(
                f"min_samples and log_first must be >= 0, worst >= 1; got {min_samples}, {log_first}, {worst}"
            )
        self.max_fraction, self.min_samples, self.log_first, self.worst = max_fraction, min_samples, log_first, worst
        self.good, self.records = 0, 0
        self.by_kind: Counter[str] = Counter()
        self.by_url: Counter[str] = Counter()

    @property
    def lost(self) -> int:
        """Samples lost to bad records so far."""
        return sum(self.by_kind.values())

    def update(self, records: Iterable[BadSample], *, good: int, check: bool = True) -> None:
        """Adds one batch's records and its count of good samples; raises past the budget when ``check``.

        Under DDP pass ``check=False`` and call :meth:`check` with ``across_ranks=True`` at the logging interval,
        so that every rank stops together instead of one rank dying while the others wait in a collective.

        Raises:
            BadSampleError: the lost fraction exceeds ``max_fraction`` after ``min_samples`` reads.
        """
        for r in records:
            r = BadSample(*r)
            self.records += 1
            n = max(int(r.lost), 0) if r.kind == "manifest" else max(int(r.lost), 1)
            self.by_kind[r.kind] += n
            self.by_url[r.url] += n
            if self.records <= self.log_first or _power_of_ten(self.records):
                where = f"{r.url} sample {r.key!r}" if r.key else r.url
                extra = "" if self.records <= self.log_first else f" ({self.records} records so far; logging 1 in 10x)"
                log.warning("skipped bad data (%s) in %s: %s%s", r.kind, where, r.message, extra)
        self.good += int(good)
        if check:
            self.check()

    def check(self, *, across_ranks: bool = False) -> None:
        """Raises :class:`BadSampleError` if the counts (summed over all ranks when ``across_ranks``, a collective
        call) exceed the budget; every rank raises the same error."""
        view = self
        if across_ranks:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                states: list = [None] * dist.get_world_size()
                dist.all_gather_object(states, self.state_dict())
                view = BadSampleBudget(
                    max_fraction=self.max_fraction, min_samples=self.min_samples, log_first=0, worst=self.worst
                )
                for st in states:
                    view.good += st["good"]
                    view.records += st["records"]
                    view.by_kind.update(st["by_kind"])
                    view.by_url.update(st["by_url"])
        total = view.good + view.lost
        if total >= view.min_samples and view.lost > view.max_fraction * total:
            raise BadSampleError(
                f"{view.lost} of {total} samples read were bad ({100 * view.lost / total:.3f}% > budget "
                f"{100 * view.max_fraction:.3f}%): {dict(view.by_kind)}; worst shards: {view.worst_shards()}"
            )

    def worst_shards(self) -> list[tuple[str, int]]:
        """The ``worst`` shards (or files) with the most lost samples, as ``(url, lost)``."""
        return self.by_url.most_common(self.worst)

    def metrics(self) -> dict[str, int]:
        """Flat counts for a metrics line: ``bad_samples`` (lost) and ``bad_<kind>`` for every kind seen."""
        return {"bad_samples": self.lost, **{f"bad_{k}": v for k, v in sorted(self.by_kind.items())}}

    def state_dict(self) -> dict:
        return {"good": self.good, "records": self.records, "by_kind": dict(self.by_kind), "by_url": dict(self.by_url)}

    def load_state_dict(self, state: dict) -> None:
        self.good, self.records = int(state["good"]), int(state["records"])
        self.by_kind, self.by_url = Counter(state["by_kind"]), Counter(state["by_url"])


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1
