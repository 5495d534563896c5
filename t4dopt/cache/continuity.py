"""Whether a call's latents continue a generation: are they a combination of its recent latents and predictions?

A deterministic sampler makes the next latents a linear combination of the current ones and
the model's predictions: Euler and flow matching (``x + dt * v``), DDIM without clipping,
DPM-Solver++ and UniPC (these two also of the last two steps' latents and predictions).
Classifier-free guidance combines the predictions of several calls at one step, and batched
guidance (CogVideoX) combines batch elements; image-to-video models append conditioning
channels to the latents and predict the latents alone (the prediction is zero-padded to the
latents' shape). So a call continues a generation when each batch element of its latents
lies, within `TOLERANCE`, in the span of every batch element of the generation's last
`WINDOW` steps' latents and predictions, and equals none of those latents.

Latents of another generation (other noise, an image noised to a lower timestep, a warm-up
call) are not in that span. Stochastic samplers (fresh noise each step), masked updates
(inpainting, Wan 2.2's image frame) and per-frame schedules (diffusion forcing) are not
either: their calls are not confirmed and compute in full, unless an explicit scope says
they are one generation (`t4dopt.cache.scope`).

The test runs on a fixed sample of each vector's values (`t4dopt.cache.readback.sample`): a
step of the same generation satisfies the combination in every value, another generation
misses it nearly everywhere. A `History` keeps, per model, thread and latent shape, the
sampled rows of recent steps in one float64 buffer on the device and their dot products on
the host; each call computes its latents' products with the buffer (read back with
everything else), and each prediction's products are computed when it is kept and read back
at the next call. The host then solves the small least-squares problems
(`relative_residual`). Nothing of the full latents or predictions is kept.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from t4dopt.cache.readback import sample

WINDOW = 3
"""Steps kept per generation: UniPC's corrector reaches two steps back from the current one."""
TOLERANCE = 1e-2
"""Largest relative L2 distance from the span still taken as a continuation (bfloat16 rounding gives ~2e-3)."""
PREDICTIONS_PER_STEP = 4
"""Predictions kept per step (guidance branches at one step); beyond, the oldest go."""
HISTORY = 4 * WINDOW
"""Steps kept per history (a few generations' windows)."""
ROWS = HISTORY * (1 + PREDICTIONS_PER_STEP)
"""Rows of the buffer per batch element: every vector of every kept step."""
HISTORIES = 8
_DEPENDENT = 1e-12
SAME = 1e-12
"""Squared distance, relative to the squared norm, under which two latents are the same."""
_uids = itertools.count()


def padded(prediction: torch.Tensor, latents_shape: torch.Size) -> torch.Tensor:
    """`prediction` as a vector of the latents' space: itself, or zero-padded where it is shorter."""
    if prediction.shape == latents_shape:
        return prediction
    out = prediction.new_zeros(latents_shape)
    region = out
    for dim, size in enumerate(prediction.shape):
        region = region.narrow(dim, 0, size)
    region.copy_(prediction)
    return out


@dataclass(eq=False)
class Record:
    """One step as continuity sees it: the rows (by id, one per batch element) of its latents and predictions."""

    timestep: tuple[float, ...]
    latents: tuple[int, ...]
    predictions: list[tuple[int, ...]] = field(default_factory=list)

    def rows(self) -> list[int]:
        return list(self.latents) + [row for prediction in self.predictions for row in prediction]


class Products(NamedTuple):
    """Dot products of a group of rows (a call's latents, or rows kept together) with the buffer and each other.

    Row r of the group has ``values[r * width + c]``: first one per buffer slot (`columns`
    maps each row id the buffer held then to its slot; `slots` is how many there were, 0
    for an empty buffer), then one per row of the group.
    """

    values: Sequence[float]
    columns: dict[int, int]
    slots: int
    group: int

    @property
    def width(self) -> int:
        return self.slots + self.group

    def with_row(self, position: int, other: int) -> float | None:
        """Product of the group's row at `position` with the kept row `other`, if it was taken."""
        column = self.columns.get(other)
        return self.values[position * self.width + column] if column is not None else None

    def within(self, a: int, b: int) -> float:
        """Product of the group's rows at positions `a` and `b`."""
        return self.values[a * self.width + self.slots + b]


class Probe(NamedTuple):
    """A call's latents as sampled rows, and their dot products with the buffer and each other (on the device)."""

    target: torch.Tensor
    products: torch.Tensor
    columns: dict[int, int]
    slots: int

    def read(self, values: Sequence[float]) -> Products:
        return Products(values, self.columns, self.slots, self.target.shape[0])


def relative_residual(entry, target: int, basis: Sequence[int]) -> float | None:
    """Distance of vector `target` from the span of vectors `basis`, relative to its norm.

    `entry(i, j)` gives their dot products (None when unknown, and then so is the answer). An
    incremental Cholesky factorisation leaves out basis vectors dependent on earlier ones.
    """
    factors: list[tuple[int, list[float], float]] = []
    for j in basis:
        weights = []
        for p, (index, row, diagonal) in enumerate(factors):
            product = entry(index, j)
            if product is None:
                return None
            weights.append((product - sum(row[q] * weights[q] for q in range(p))) / diagonal)
        norm = entry(j, j)
        if norm is None:
            return None
        remainder = norm - sum(w * w for w in weights)
        if remainder > _DEPENDENT * max(norm, 1e-300):
            factors.append((j, weights, math.sqrt(remainder)))
    norm = entry(target, target)
    if not norm or norm <= 0:
        return 0.0 if norm is not None else None
    projection = []
    for p, (index, row, diagonal) in enumerate(factors):
        product = entry(index, target)
        if product is None:
            return None
        projection.append((product - sum(row[q] * projection[q] for q in range(p))) / diagonal)
    return math.sqrt(max(norm - sum(y * y for y in projection), 0.0) / norm)


class History:
    """The recent steps of one model in one thread at one latent shape, shared by every graph compiled from it.

    Guidance branches may run in different compiled graphs (dynamo compiles again for inputs
    of another kind, an inference-mode tensor say), yet the next latents combine all their
    predictions: each graph adds its prediction to the step's one `Record`.

    Row ids grow with time; the product of two kept rows is held by the newer one, which was
    compared with everything in the buffer when it was kept (`known`).
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.records: deque[Record] = deque(maxlen=HISTORY)
        self.buffer: torch.Tensor | None = None
        self.slots: list[int | None] = [None] * (ROWS * batch)
        self.known: dict[int, tuple[int, tuple[int, ...], Products]] = {}
        """Per kept row id: its position in its group, the group's rows, the group's products."""
        self._next = 0
        self._pending: tuple[tuple[int, ...], torch.Tensor, dict[int, int]] | None = None
        """Rows kept at the last call, their products (not read yet), the slots of the rows held then."""

    def _columns(self) -> dict[int, int]:
        return {row: slot for slot, row in enumerate(self.slots) if row is not None}

    # --- per call -------------------------------------------------------------------------------

    def probe(self, latents: torch.Tensor) -> Probe:
        """The call's sampled latents and their products with everything kept (computed on the device)."""
        target = sample(latents, self.batch)
        own = target @ target.T
        if self.buffer is None:
            return Probe(target, own, {}, 0)
        return Probe(target, torch.cat([target @ self.buffer.T, own], dim=1), self._columns(), len(self.slots))

    def pending(self) -> torch.Tensor | None:
        """The products of the rows kept at the last call, to read back with this call's."""
        return self._pending[1] if self._pending is not None else None

    def learn(self, values: Sequence[float]) -> None:
        """Take in the products of the rows kept at the last call (`pending`), as read back."""
        if self._pending is None:
            return
        rows, _, columns = self._pending
        self._know(rows, Products(values, columns, len(self.slots), len(rows)))
        self._pending = None

    def product(self, a: int, b: int) -> float | None:
        """The product of kept rows `a` and `b`, if known (the newer one holds it)."""
        newer, older = (a, b) if a >= b else (b, a)
        if newer not in self.known or older not in self.known:
            return None
        position, group, products = self.known[newer]
        if older in group:
            return products.within(position, group.index(older))
        return products.with_row(position, older)

    def _entries(self, call: Products, target: int):
        """Products among batch element `target` of the call's latents (row None) and kept rows."""
        def entry(a: int | None, b: int | None) -> float | None:
            if a is None and b is None:
                return call.within(target, target)
            if a is None or b is None:
                return call.with_row(target, a if b is None else b)
            return self.product(a, b)
        return entry

    def residual(self, call: Products, target: int, basis: Sequence[int]) -> float | None:
        """Relative distance of batch element `target` of the call's latents from the span of kept rows `basis`."""
        entry = self._entries(call, target)
        rows = [None] + [row for row in basis if row in call.columns and row in self.known]
        if len(rows) == 1:
            return None
        return relative_residual(lambda i, j: entry(rows[i], rows[j]), 0, range(1, len(rows)))

    def same(self, call: Products, record: Record) -> bool:
        """Whether the call's latents are `record`'s (every batch element within `SAME`)."""
        for target, row in enumerate(record.latents):
            entry = self._entries(call, target)
            own, cross, other = entry(None, None), entry(None, row), entry(row, row)
            if cross is None or other is None or own - 2 * cross + other > SAME * max(own, 1e-300):
                return False
        return True

    # --- keeping a step ---------------------------------------------------------------------------

    def step(self, probe: Probe, call: Products, timestep: tuple[float, ...]) -> Record:
        """The record of the step called with the probed latents at `timestep`; kept (their rows too) if new."""
        for record in self.records:
            if record.timestep == timestep and self.same(call, record):
                return record
        rows = self._insert(probe.target)
        self._know(rows, call)
        record = Record(timestep, rows)
        self.records.append(record)
        return record

    def predicted(self, record: Record, prediction: torch.Tensor, latents_shape: torch.Size) -> None:
        """Keep `prediction` (made at `record`'s step) as rows; its products are read back at the next call."""
        vector = sample(padded(prediction, latents_shape), self.batch)
        columns = self._columns()
        rows = self._insert(vector)
        record.predictions = (record.predictions + [rows])[-PREDICTIONS_PER_STEP:]
        products = torch.cat([vector @ self.buffer.T, vector @ vector.T], dim=1)
        # Products of an earlier keep no call has read yet are dropped: those rows stay unknown.
        self._pending = (rows, products, columns)

    def _know(self, rows: tuple[int, ...], products: Products) -> None:
        for position, row in enumerate(rows):
            self.known[row] = (position, rows, products)

    def _insert(self, vectors: torch.Tensor) -> tuple[int, ...]:
        if self.buffer is None:
            self.buffer = vectors.new_zeros(len(self.slots), vectors.shape[1])
        rows = []
        for vector in vectors:
            slot = self._next
            self._next = (self._next + 1) % len(self.slots)
            self.known.pop(self.slots[slot], None)
            row = next(_uids)
            self.buffer[slot] = vector
            self.slots[slot] = row
            rows.append(row)
        return tuple(rows)

    def held_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size() if self.buffer is not None else 0


class _ThreadHistories(threading.local):
    """This thread's histories, per model (held weakly: a model's go with it) and latent shape.

    Found by the model object itself, not by an id: an id (of a model's parameter, or a thread's
    ident) is reused once its object is gone, and a new model or thread must never read a dead
    one's history as its own. (Tensors compare elementwise, so this is not a WeakKeyDictionary.)
    """

    def __init__(self) -> None:
        self.by_model: dict[int, tuple[weakref.ref, OrderedDict[Hashable, History]]] = {}

    def of(self, model: object) -> OrderedDict[Hashable, History]:
        entry = self.by_model.get(id(model))
        if entry is None or entry[0]() is not model:
            by_model, ident = self.by_model, id(model)

            def forget(ref: weakref.ref) -> None:
                if by_model.get(ident, (None,))[0] is ref:
                    del by_model[ident]

            entry = self.by_model[ident] = (weakref.ref(model, forget), OrderedDict())
        return entry[1]


_histories = _ThreadHistories()


def history(model: object, key: Hashable, batch: int) -> History:
    """The history of `model` (an object that lives as long as it: one of its parameters) under `key`
    (latent shape, dtype, device) in this thread; beyond `HISTORIES` per model the least recently used go."""
    kept = _histories.of(model)
    found = kept.get(key)
    if found is None:
        found = kept[key] = History(batch)
        while len(kept) > HISTORIES:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return found
