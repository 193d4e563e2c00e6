"""Data mixtures: which source every slot of every global batch comes from, and which of that source's blocks — a pure
function of (seed, step, mixture, manifest), the same at every world size and on resume at any step, exact to the
sample.

    python -m trainer.mixture RUN_DIR/data 200 8 web=0.7 code=0.3     # each source's share of 200 steps of 8

Weights are integers out of D = 2^20 (a share is exact to ~1e-6). Slot j of a phase (counted from the phase's first
step, B slots a step) has the position p_j = j·G mod D, G odd and ≈ D/φ (φ the golden ratio): over any D consecutive
slots every position occurs once (G and D are coprime), and any run of slots spreads its positions evenly over [0, D)
(a Weyl sequence; three-distance theorem). Source k owns the positions [C_{k-1}, C_k) of its cumulative weight, so it
gets exactly W_k slots of every D, and within a few slots of its share of any run of slots. How many slots source k
had before slot J is (J div D)·W_k plus a count over the J mod D positions left: at most D, so a resume at any step
costs milliseconds.

Source k is an endless stream of its own blocks (a `trainer.data.SampleOrder` of its own): epoch e is
`default_rng([seed, k, e]).permutation(n_k)` of its n_k blocks, and its i-th slot (over all phases) takes stream
position i. A source that runs out goes on with a new permutation; `epochs` reports where each stands.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.config import DataError
from data_pipeline.manifest import Manifest
from trainer.data import SampleOrder, rank_bounds

D = 1 << 20
"""Weight resolution: each phase's weights become integers summing to D."""
G = 648_055
"""Slot stride: odd (coprime with D) and ≈ D/φ, the most even spread a stride gives."""


@dataclass(frozen=True)
class Phase:
    """Weights for the global steps before `until` (0-based, exclusive; None: to the end)."""

    until: int | None
    weights: np.ndarray  # (sources,) int64 summing to D


def integer_weights(shares: list[float]) -> np.ndarray:
    """Non-negative shares → int64 weights summing to D (largest remainder; ties to the first source)."""
    total = float(sum(shares))
    if total <= 0 or any(s < 0 for s in shares):
        raise DataError(f"mixture weights must be ≥ 0 with a positive sum, got {shares}")
    exact = np.array(shares, dtype=np.float64) * D / total
    weights = np.floor(exact).astype(np.int64)
    short = D - int(weights.sum())
    order = np.lexsort((np.arange(len(shares)), -(exact - weights)))  # largest remainder first, then source order
    weights[order[:short]] += 1
    return weights


class MixtureOrder:
    """The endless sequence of sample ids of a mixture of sources (see the module docstring).

    `starts[k]` is the first sample id of source k's contiguous range of `sizes[k]` blocks in the train split."""

    def __init__(self, starts: list[int], sizes: list[int], phases: list[Phase], seed: int):
        if not phases or phases[-1].until is not None:
            raise ValueError("the last phase must run to the end")
        for k, n in enumerate(sizes):
            if n < 1 and any(p.weights[k] for p in phases):
                raise DataError(f"source {k} has no train blocks but a weight in the mixture")
        self.starts, self.sizes = np.array(starts, dtype=np.int64), np.array(sizes, dtype=np.int64)
        self.phases, self.seed = phases, seed
        self.bounds = [np.concatenate([[0], np.cumsum(p.weights)]) for p in phases]
        self._streams = {k: SampleOrder(n, seed, stream=(k,)) for k, n in enumerate(sizes) if n}  # epochs of a source
        self._lock = threading.Lock()  # the reader thread and the metrics share the positions
        self._positions = Positions(len(sizes))

    # -------------------------------------------------------------- slots → sources
    def _phase_of(self, step: int) -> tuple[int, int]:
        """(phase index, its first step) of a global step."""
        first = 0
        for i, phase in enumerate(self.phases):
            if phase.until is None or step < phase.until:
                return i, first
            first = phase.until
        raise AssertionError("unreachable: the last phase has no end")

    def _sources(self, phase: int, first_slot: int, count: int) -> np.ndarray:
        """The source of each of `count` slots of a phase from its slot `first_slot`."""
        positions = (np.arange(first_slot, first_slot + count, dtype=np.int64) * G) % D
        return np.searchsorted(self.bounds[phase], positions, side="right") - 1

    def _slots_before(self, phase: int, slot: int) -> np.ndarray:
        """Slots each source had in a phase before its slot `slot`."""
        rounds, rest = divmod(slot, D)
        counts = rounds * self.phases[phase].weights
        if rest:
            counts = counts + np.bincount(self._sources(phase, rounds * D, rest), minlength=len(self.sizes))
        return counts

    def consumed(self, step: int, batch: int) -> np.ndarray:
        """Blocks each source has given before global step `step` (0-based): its stream position. Advanced from the
        last answer when it is a little behind (O(B) a step, as training goes), else computed (O(D) at most)."""
        with self._lock:
            return self._positions.at(step, batch, self._step_sources, self._consumed)

    def _step_sources(self, step: int, batch: int) -> np.ndarray:
        """The source of each slot of a global step."""
        phase, first = self._phase_of(step)
        return self._sources(phase, (step - first) * batch, batch)

    def _consumed(self, step: int, batch: int) -> np.ndarray:
        total = np.zeros(len(self.sizes), dtype=np.int64)
        first = 0
        for i, phase in enumerate(self.phases):
            end = step if phase.until is None else min(step, phase.until)
            if end > first:
                total += self._slots_before(i, (end - first) * batch)
            if phase.until is None or step <= phase.until:
                break
            first = phase.until
        return total

    # -------------------------------------------------------------- sources → sample ids
    def global_batch(self, step: int, batch: int) -> np.ndarray:
        """The B sample ids of global step `step` (from 0), in slot order."""
        sources = self._step_sources(step, batch)
        position = self.consumed(step, batch)
        ids = np.empty(batch, dtype=np.int64)
        for k in np.unique(sources):
            where = sources == k
            start = int(position[k])
            ids[where] = self._streams[int(k)].span(start, start + int(where.sum())) + self.starts[k]
        return ids

    def rank_slice(self, step: int, batch: int, rank: int, world: int) -> np.ndarray:
        """Rank r's contiguous part of that global batch."""
        bounds = rank_bounds(batch, world)
        return self.global_batch(step, batch)[bounds[rank] : bounds[rank + 1]]

    def source_of(self, ids: np.ndarray) -> np.ndarray:
        """The source of each sample id."""
        return np.searchsorted(self.starts, ids, side="right") - 1

    def epochs(self, step: int, batch: int) -> list[int]:
        """The epoch each source's stream is in after global step `step` (0-based) has been trained."""
        consumed = self.consumed(step + 1, batch)
        return [int(c // n) if n else 0 for c, n in zip(consumed, self.sizes)]


class Positions:
    """Recent answers of "blocks each source gave before step s", so that the next one (the reader a few steps ahead,
    the metrics a few behind) is advanced from the nearest earlier answer in O(B) a step instead of computed anew."""

    def __init__(self, sources: int, keep: int = 16, reach: int = 64):
        self.sources, self.keep, self.reach = sources, keep, reach
        self.known: dict[tuple[int, int], np.ndarray] = {}

    def at(self, step: int, batch: int, step_sources: Callable[[int, int], np.ndarray],
           compute: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """`compute(step, batch)`, or an earlier answer plus the counts of `step_sources(s, batch)` of the steps
        between."""
        earlier = [s for b, s in self.known if b == batch and step - self.reach <= s <= step]
        if earlier:
            start = max(earlier)
            counts = self.known[(batch, start)].copy()
            for s in range(start, step):
                counts += np.bincount(step_sources(s, batch), minlength=self.sources)
        else:
            counts = compute(step, batch)
        if len(self.known) >= self.keep:
            self.known.pop(next(iter(self.known)))
        self.known[(batch, step)] = counts
        return counts.copy()


Phases = list[tuple[int | None, dict[str, float]]]
"""`data_pipeline.config.DataConfig.phases()`: (last 1-based step or None, weights by source name) per phase."""


def moved_boundaries(old: Any, new: Any, step: int) -> bool:
    """Whether a run's recorded mixture (`old`, from its fingerprint) and the config's (`new`) differ only in phase
    ends that are both still ahead of `step`, the last step trained: the schedule of every step trained so far is
    the same. That change continues the run; any other is another run."""
    if not isinstance(old, list) or not isinstance(new, list) or len(old) != len(new) or old == new:
        return False
    for (old_until, old_weights), (new_until, new_weights) in zip(old, new):
        if old_weights != new_weights:
            return False
        if old_until != new_until and not (old_until is not None and new_until is not None
                                           and min(old_until, new_until) >= step):
            return False
    return True


def consumed_alike(order: SampleOrder, starts: np.ndarray, step: int, batch: int) -> np.ndarray:
    """Blocks each source gave before global step `step` when every block of the corpus is drawn alike
    (`trainer.data.SampleOrder`): whole epochs give every block once, the current one its permutation's prefix."""
    epoch, offset = divmod(step * batch, order.n)
    sizes = np.diff(np.append(starts, order.n))
    return epoch * sizes + np.bincount(np.searchsorted(starts, order.epoch(epoch)[:offset], side="right") - 1,
                                       minlength=len(starts))


class Sources:
    """The sources of a run's train split, its sample order, and what each source has given so far (the metrics)."""

    def __init__(self, manifest: Manifest, phases: Phases | None, seed: int):
        ranges = manifest.source_ranges("train")
        self.names = list(ranges)
        self.starts = np.array([ranges[n][0] for n in self.names], dtype=np.int64)
        sizes = [ranges[n][1] for n in self.names]
        total = sum(sizes)
        if phases is None:
            self.order: SampleOrder | MixtureOrder = SampleOrder(total, seed)
        else:
            for _, weights in phases:
                if missing := sorted(set(weights) - set(self.names)):
                    raise DataError(f"data.mixture names {', '.join(missing)}, which the prepared data does not hold "
                                    f"(its sources: {', '.join(self.names)}); prepare with that source")
                if empty := sorted(n for n in weights if ranges[n][1] == 0):
                    raise DataError(f"data.mixture gives a weight to {', '.join(empty)}, which has no train block "
                                    "(too little text after cleaning and dedup)")
            self.order = MixtureOrder(list(self.starts), sizes, [
                Phase(until, integer_weights([weights.get(n, 0.0) for n in self.names])) for until, weights in phases
            ], seed)
        self.sizes = np.array(sizes, dtype=np.int64)
        self._positions = Positions(len(sizes))  # only the metrics (one thread) ask

    def consumed(self, step: int, batch: int) -> np.ndarray:
        """Blocks each source gave to global steps 0..step-1 (advanced from the last answer as training goes)."""
        if isinstance(self.order, MixtureOrder):
            return self.order.consumed(step, batch)
        order = self.order
        return self._positions.at(
            step, batch, lambda s, b: np.searchsorted(self.starts, order.global_batch(s, b), side="right") - 1,
            lambda s, b: consumed_alike(order, self.starts, s, b))

    def metrics(self, steps_done: int, batch: int, block_tokens: int) -> dict[str, Any]:
        """Tokens trained on per source (cumulative) and the epoch each source's blocks are in, after `steps_done`
        steps."""
        consumed = self.consumed(steps_done, batch)
        return {
            "source_tokens": {n: int(c) * block_tokens for n, c in zip(self.names, consumed)},
            "source_epoch": {n: int(c // s) if s else 0 for n, c, s in zip(self.names, consumed, self.sizes)},
        }


if __name__ == "__main__":
    from data_pipeline.manifest import read_manifest

    folder, steps, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mix = {a.split("=")[0]: float(a.split("=")[1]) for a in sys.argv[4:]}
    sources = Sources(read_manifest(folder), [(None, mix)] if mix else None, seed=1337)
    for name, count in zip(sources.names, sources.consumed(steps, size)):
        print(f"{name}: {count / (steps * size):.4f} of {steps * size} samples")
