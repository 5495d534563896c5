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

The span test needs the Gram matrix of those vectors, computed on the device in float64
(`gram`) and read back with everything else (`t4dopt.cache.readback`); the host solves the
small least-squares problems (`relative_residual`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

WINDOW = 3
"""Steps kept per generation: UniPC's corrector reaches two steps back from the current one."""
TOLERANCE = 1e-2
"""Largest relative L2 distance from the span still taken as a continuation (bfloat16 rounding gives ~2e-3)."""
PREDICTIONS_PER_STEP = 4
"""Predictions kept per step (guidance branches at one step); beyond, the oldest go."""
HISTORY = 4 * WINDOW
"""Steps kept per history (a few generations' windows)."""
HISTORIES = 8
_CHUNK = 1 << 22
"""Columns per piece of the Gram product (bounds its temporary memory)."""
_DEPENDENT = 1e-12


def padded(prediction: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """`prediction` as a vector of the latents' space: itself, or zero-padded where it is shorter."""
    if prediction.shape == latents.shape:
        return prediction
    out = prediction.new_zeros(latents.shape)
    region = out
    for dim, size in enumerate(prediction.shape):
        region = region.narrow(dim, 0, size)
    region.copy_(prediction)
    return out


def _version(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


@dataclass(eq=False)
class Record:
    """One step as continuity sees it: a copy of the latents the step was called with, the predictions made from them.

    Predictions are the runtime's own outputs, kept by reference with their version: one
    changed in place since is left out. Tensors made under ``torch.inference_mode`` have no
    version; theirs are kept as they are.
    """

    latents: torch.Tensor
    fingerprint: tuple[float, ...]
    timestep: tuple[float, ...]
    predictions: list[tuple[torch.Tensor, int | None]] = field(default_factory=list)

    def add(self, prediction: torch.Tensor) -> None:
        vector = padded(prediction.detach(), self.latents)
        self.predictions = (self.predictions + [(vector, _version(vector))])[-PREDICTIONS_PER_STEP:]

    def vectors(self) -> list[torch.Tensor]:
        """The latents, then each prediction not changed since it was kept."""
        return [self.latents] + [p for p, version in self.predictions if _version(p) == version]

    def tensors(self) -> list[torch.Tensor]:
        return [self.latents] + [p for p, _ in self.predictions]


class History:
    """The recent steps of one model in one thread, shared by every graph compiled from it.

    Guidance branches may run in different compiled graphs (dynamo compiles again for inputs
    of another kind, an inference-mode tensor say), yet the next latents combine all their
    predictions: each graph adds its prediction to the step's one `Record`.
    """

    def __init__(self) -> None:
        self.records: deque[Record] = deque(maxlen=HISTORY)

    def step(self, latents: torch.Tensor, fingerprint: tuple[float, ...], timestep: tuple[float, ...]) -> Record:
        """The record of the step called with these latents at this timestep, made (with a copy of them) if new."""
        for record in self.records:
            if (record.fingerprint == fingerprint and record.timestep == timestep
                    and record.latents.shape == latents.shape and record.latents.dtype == latents.dtype):
                return record
        record = Record(latents.detach().clone(), fingerprint, timestep)
        self.records.append(record)
        return record


_histories: OrderedDict[Hashable, History] = OrderedDict()
_histories_lock = threading.Lock()


def history(key: Hashable) -> History:
    """The history kept under `key` (a thread and a model); the least recently used beyond `HISTORIES` go."""
    with _histories_lock:
        found = _histories.get(key)
        if found is None:
            found = _histories[key] = History()
            while len(_histories) > HISTORIES:
                _histories.popitem(last=False)
        _histories.move_to_end(key)
        return found


@dataclass(frozen=True)
class GramLayout:
    """Which rows of a Gram matrix hold what: the call's latents first (one row per batch element), then each record's."""

    size: int
    target: tuple[int, ...]
    rows: dict[int, tuple[int, ...]]
    """Per record (by id), its rows."""


def gram(latents: torch.Tensor, records: Sequence[Record]) -> tuple[torch.Tensor, GramLayout]:
    """The float64 Gram matrix of the batch elements of `latents` and of every vector of `records`, and its layout."""
    batch = latents.shape[0]
    slices = [latents.reshape(batch, -1)]
    rows: dict[int, tuple[int, ...]] = {}
    start = batch
    for record in records:
        vectors = record.vectors()
        slices += [v.reshape(batch, -1) for v in vectors]
        rows[id(record)] = tuple(range(start, start + batch * len(vectors)))
        start += batch * len(vectors)
    columns = slices[0].shape[1]
    step = max(1, _CHUNK // start)
    product = torch.zeros(start, start, dtype=torch.float64, device=latents.device)
    for first in range(0, columns, step):
        block = torch.cat([s[:, first:first + step] for s in slices]).to(torch.float64)
        product += block @ block.T
    return product, GramLayout(start, tuple(range(batch)), rows)


def relative_residual(matrix: Sequence[float], size: int, target: int, basis: Sequence[int]) -> float:
    """Distance of vector `target` from the span of vectors `basis`, relative to its norm, from their Gram `matrix`.

    `matrix` is the row-major Gram matrix as floats. An incremental Cholesky factorisation
    leaves out basis vectors dependent on earlier ones.
    """

    def entry(i: int, j: int) -> float:
        return matrix[i * size + j]

    factors: list[tuple[int, list[float], float]] = []
    for j in basis:
        weights = []
        for p, (index, row, diagonal) in enumerate(factors):
            weights.append((entry(index, j) - sum(row[q] * weights[q] for q in range(p))) / diagonal)
        remainder = entry(j, j) - sum(w * w for w in weights)
        if remainder > _DEPENDENT * max(entry(j, j), 1e-300):
            factors.append((j, weights, math.sqrt(remainder)))
    norm = entry(target, target)
    if norm <= 0:
        return 0.0
    projection = []
    for p, (index, row, diagonal) in enumerate(factors):
        projection.append((entry(index, target) - sum(row[q] * projection[q] for q in range(p))) / diagonal)
    return math.sqrt(max(norm - sum(y * y for y in projection), 0.0) / norm)
