"""Which generation, guidance branch and step each call belongs to, so cached state never crosses generations.

State lives in *tracks*: one branch of one generation (classifier-free guidance runs two
tracks side by side); the n-th call of a track is its step n. Tracks live in *domains*, and a
call looks for its track only in its own domain. The rules, in order (also in the README):

1. **Domain.** A call inside ``with t4dopt.generation(...)`` uses that scope's domain; any
   other call, its thread's. Either way, a graph serving several modules (regional
   compilation, two copies of one model class) keeps one domain per module (by the identity
   of the parameters it is called with).
2. **Lane.** A branch name (``t4dopt.branch``, diffusers' ``cache_context``) says which track a
   call continues. Without one, calls of one track have the same input shapes and the same
   conditioning: every input but the latents and the timestep, compared by content.
3. **Step.** A timestep above the track's last one (in any element: per-frame and per-token
   timesteps are compared whole) starts a new generation in the lane. Outside a scope a track
   also never takes two calls at one timestep (a branch runs once per step): another call
   there is another generation (a warm-up call, a restart, a second request).
4. **Continuity** (outside a scope). The latents must be the sampler's next step from the
   track's last ones (`t4dopt.cache.continuity`). Of the tracks a call could continue, the
   one used last wins; when it could continue one by its timestep but continues none, it
   starts a new generation, computed in full, with a warning (once): detection cannot be
   sure there, and only an explicit scope can say more.

A new track starts empty, so the first call of a generation never reuses. Memory is bounded:
at most `MAX_TRACKS` tracks per domain and `MAX_DOMAINS` domains per runtime (the least
recently used go), a scope's domain is freed when the scope ends, and a track that reached
the ``steps`` option's last step is freed after it.
"""

from __future__ import annotations

import operator
import threading
import warnings
import weakref
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from t4dopt.cache import continuity, scope
from t4dopt.cache.arithmetic import drift_ratio
from t4dopt.cache.parameters import ParameterSet
from t4dopt.cache.program import Program
from t4dopt.cache.readback import Readback, fingerprint
from t4dopt.cache.state import DriftReading, SlotState
from t4dopt.errors import T4DWarning

MAX_TRACKS = 4
"""Tracks per domain: two guidance branches of two interleaved generations."""
MAX_DOMAINS = 4
"""Domains per runtime (threads, scopes and modules)."""


@dataclass(eq=False)
class Track:
    """One branch of one generation: its cache state, its step, its timesteps and (outside scopes) its last steps."""

    lane: Hashable
    slot: SlotState
    first: float | None
    timestep: tuple[float, ...]
    step: int = 0
    records: deque = field(default_factory=lambda: deque(maxlen=continuity.WINDOW))


@dataclass(eq=False)
class Domain:
    """The tracks of one thread or scope, for one module; `detect`: no scope, so continuity is checked."""

    scope: scope.Scope | None
    anchor: Any
    """A weak reference to the first parameter it was called with (ids are reused once tensors are freed)."""
    tracks: list[Track] = field(default_factory=list)
    """Least recently used first."""
    epoch: tuple[float, ...] | None = None
    """The first timestep of the generation the report counts now."""
    epoch_advanced: bool = False
    """Whether a track has gone past its first step since; a track starting then starts a new generation."""
    lanes_started: int = 0

    @property
    def detect(self) -> bool:
        return self.scope is None


class Continuity(NamedTuple):
    """A call's continuity check outside a scope: its history, its latents probed, their products as read."""

    history: continuity.History
    probe: continuity.Probe
    products: continuity.Products


class Placement(NamedTuple):
    """Where a call falls: its track, whether the track is new, whether the report starts a new generation."""

    track: Track
    new_generation: bool
    new_epoch: bool
    step: int
    first_timestep: float | None
    timestep: float | None
    domain: Domain
    check: Continuity | None
    """Outside scopes, for `Generations.recorded`."""


def _leaf_index(program: Program, name: str | None) -> int | None:
    for index, leaf in enumerate(program.output_leaves):
        if isinstance(leaf, dict) and leaf["value"] == name:
            return index
    return None


def _progressed(now: Sequence[float], before: Sequence[float]) -> bool:
    """Every element at or below, one strictly below: the next step of a schedule running down."""
    return all(a <= b for a, b in zip(now, before)) and any(a < b for a, b in zip(now, before))


def _above(now: Sequence[float], before: Sequence[float]) -> bool:
    return any(a > b for a, b in zip(now, before))


class Generations:
    """Places the calls of one runtime (`owner`) running `program` into tracks (see the module doc)."""

    def __init__(self, program: Program, owner: Any, parameters: ParameterSet):
        # The owner by weak reference: a cycle would keep a runtime alive after dynamo drops it.
        self.program, self._owner, self.parameters = program, weakref.ref(owner), parameters
        names, static = program.placeholders, set(program.static)
        self.static = [i for i, n in enumerate(names) if n in static]
        # The parameters' identities name a call's domain: read at C speed (a model has hundreds).
        self._statics = operator.itemgetter(*self.static) if len(self.static) > 1 else (
            lambda args: tuple(args[i] for i in self.static))
        self.stream = names.index(program.stream) if program.stream in names else None
        self.timestep = names.index(program.timestep) if program.timestep in names else None
        self.dynamic = [i for i, n in enumerate(names) if n not in static]
        self.conditioning = [i for i in self.dynamic if i not in (self.stream, self.timestep)]
        self.prediction = _leaf_index(program, program.prediction)
        self.domains: OrderedDict[tuple, Domain] = OrderedDict()
        self._warned: set[str] = set()
        self.group = None
        """The process group the graph's collectives run over (context parallelism): reads are reduced over it."""

    # --- bookkeeping ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every track: each next call starts a generation."""
        self.domains.clear()

    def end_scope(self, ended: scope.Scope) -> None:
        for key in [k for k, d in self.domains.items() if d.scope is ended]:
            del self.domains[key]

    def free(self, placement: Placement) -> None:
        """Drop `placement`'s track (its generation is over)."""
        if placement.track in placement.domain.tracks:
            placement.domain.tracks.remove(placement.track)

    def held_bytes(self) -> int:
        """Bytes of device memory the tracks hold (each storage counted once)."""
        storages: dict[int, int] = {}
        for domain in self.domains.values():
            for track in domain.tracks:
                for tensor in _tensors_of(track):
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, T4DWarning, stacklevel=4)

    def _domain(self, args: tuple, key: tuple[int, ...], active: scope.Scope | None) -> tuple[Domain, bool]:
        """The call's domain, and whether it is new."""
        name = (active.token if active is not None else None, threading.get_ident(), key)
        domain = self.domains.get(name)
        anchor = args[self.static[0]] if self.static else None
        if domain is not None and (domain.anchor is None) == (anchor is None) and (
                anchor is None or domain.anchor() is anchor):
            self.domains.move_to_end(name)
            return domain, False
        domain = Domain(active, weakref.ref(anchor) if anchor is not None else None)
        self.domains[name] = domain
        while len(self.domains) > MAX_DOMAINS:
            self.domains.popitem(last=False)
        if active is not None:
            active.used_by(self._owner())
        self.parameters.update(args[i] for i in self.static)
        return domain, True

    # --- placing a call ---------------------------------------------------------------------------

    def place(self, args: tuple, units: int, chains: int) -> Placement:
        """The track of a call with `args`, after the runtime's one device read (timestep, identities, drifts)."""
        key = tuple(map(id, self._statics(args)))
        owner = self._owner()
        active = scope.active_scope(owner, key)
        name = scope.active_branch(owner, key)
        domain, new_domain = self._domain(args, key, active)
        values, check = self._read(args, key, name, domain)
        timestep = args[self.timestep] if self.timestep is not None else None
        now = tuple(values["timestep"]) if "timestep" in values else (
            (float(timestep),) if isinstance(timestep, (int, float)) else ())
        signature = self._signature(args)
        lane = (signature, "branch", name) if name is not None else (
            signature, tuple(tuple(values[f"input{i}"]) for i in self.conditioning if f"input{i}" in values))
        track = self._continued(domain, lane, now, check)
        new = track is None
        if new:
            track = Track(lane, SlotState.empty(units, chains), max(now) if now else None, now)
            new_epoch = self._start(domain, track) or new_domain
        else:
            domain.tracks.remove(track)
            domain.tracks.append(track)
            track.step, track.timestep, domain.epoch_advanced = track.step + 1, now, True
            new_epoch = new_domain
        return Placement(track, new, new_epoch, track.step, track.first, max(now) if now else None, domain, check)

    def _read(self, args: tuple, key: tuple[int, ...], name: str | None,
              domain: Domain) -> tuple[dict[str, list[float]], Continuity | None]:
        """The one device read: the timestep, the conditioning's fingerprints (without a branch name), the
        continuity products (outside scopes) and the drifts the domain's tracks measured; the drifts are
        handed to their states."""
        readback = Readback()
        timestep = args[self.timestep] if self.timestep is not None else None
        if isinstance(timestep, torch.Tensor):
            readback.add("timestep", timestep)
        if name is None:
            for index in self.conditioning:
                if isinstance(args[index], torch.Tensor):
                    readback.add(f"input{index}", fingerprint(args[index]))
        latents = args[self.stream] if self.stream is not None else None
        shared = self._history(args, latents) if domain.detect else None
        probe = shared.probe(latents) if shared is not None else None
        if probe is not None:
            readback.add("products", probe.products)
            if shared.pending() is not None:
                readback.add("pending", shared.pending())
        readings: list[DriftReading] = []
        for track in domain.tracks:
            readings += track.slot.readings
            track.slot.readings = []
        if readings:
            readback.add("drifts", torch.stack([reading.drift.reshape(2) for reading in readings]), summed=True)
        values = readback.read(self.group)
        sums = values.get("drifts", [])
        for reading, change, norm in zip(readings, sums[0::2], sums[1::2]):
            reading.state.measured(drift_ratio(change, norm), reading.distance)
        if probe is None:
            return values, None
        shared.learn(values.get("pending", ()))
        return values, Continuity(shared, probe, probe.read(values["products"]))

    def _start(self, domain: Domain, track: Track) -> bool:
        """Add a new `track` to `domain`; whether the report starts counting a new generation."""
        domain.tracks.append(track)
        while len(domain.tracks) > MAX_TRACKS:
            domain.tracks.pop(0)
        domain.lanes_started += 1
        if not domain.detect and domain.lanes_started > 4 * MAX_TRACKS:
            self._warn("lanes", "turbo4d cache: calls in one t4dopt.generation scope keep arriving with new "
                       "conditioning inputs, so each computes in full; name the branches with "
                       "t4dopt.branch(model, name) (diffusers: transformer.cache_context(name))")
        # Another branch of the first step of the generation counted now joins it; any other starts one.
        if domain.epoch_advanced or domain.epoch != track.timestep:
            domain.epoch, domain.epoch_advanced = track.timestep, False
            return True
        return False

    def _history(self, args: tuple, latents: Any) -> continuity.History | None:
        """The continuity history of this model, thread and latent shape (None when it cannot be checked)."""
        if not isinstance(latents, torch.Tensor) or self.prediction is None:
            return None
        model = args[self.static[0]] if self.static else self._owner()
        if model is None:
            return None
        return continuity.history(model, (tuple(latents.shape), latents.dtype, latents.device), latents.shape[0])

    def _continued(self, domain: Domain, lane: Hashable, now: tuple[float, ...], check: Continuity | None) -> Track | None:
        """The track the call continues, or None for a new one (rules 3 and 4 of the module doc)."""
        in_lane = [t for t in reversed(domain.tracks) if t.lane == lane and len(t.timestep) == len(now)]
        if not domain.detect:
            # One track per lane in a scope; a timestep going up restarts it.
            for track in in_lane:
                domain.tracks.remove(track)
            if in_lane and not _above(now, in_lane[0].timestep):
                domain.tracks.append(in_lane[0])
                return in_lane[0]
            return None
        candidates = [t for t in in_lane if _progressed(now, t.timestep)]
        for track in candidates:
            if check is not None and self._continues(track, check):
                return track
        if candidates:
            domain.tracks.remove(candidates[0])
            why = ("the graph returns no prediction of its latents, so they cannot be checked"
                   if self.prediction is None else
                   "its latents are not the sampler's next step from that branch's last ones")
            self._warn("unconfirmed", f"turbo4d cache: a call at a lower timestep than the last call of its branch "
                       f"was not confirmed as that branch's next step ({why}); it starts a new generation and "
                       "computes in full. A new generation (a restart, image-to-video), a stochastic sampler, a "
                       "masked update or per-frame timesteps look like this: to reuse work across such steps, run "
                       "each generation inside `with t4dopt.generation(model):` (diffusers pipelines: "
                       "t4dopt.enable(pipe))")
        return None

    @staticmethod
    def _continues(track: Track, check: Continuity) -> bool:
        """Whether the call's latents are the sampler's next step from `track`'s recent steps."""
        history, probe, products = check
        if not track.records or any(history.same(products, record) for record in track.records):
            return False
        basis = [row for record in track.records for row in record.rows()]
        for target in range(history.batch):
            residual = history.residual(products, target, basis)
            if residual is None or residual > continuity.TOLERANCE:
                return False
        return True

    def recorded(self, placement: Placement, args: tuple, outputs: Any) -> None:
        """After a call outside a scope: keep its latents and prediction for checking the next call.

        They go to the step's record in the history of this model, thread and latent shape,
        which every graph compiled from the model shares (`continuity.History`).
        """
        check = placement.check
        if check is None:
            return
        leaves = pytree.tree_leaves(outputs)
        if self.prediction >= len(leaves) or not isinstance(leaves[self.prediction], torch.Tensor):
            return
        track = placement.track
        record = check.history.step(check.probe, check.products, track.timestep)
        check.history.predicted(record, leaves[self.prediction].detach(), args[self.stream].shape)
        if not track.records or track.records[-1] is not record:
            track.records.append(record)

    def _signature(self, args: tuple) -> tuple:
        """Shapes, dtypes and devices of the inputs that change between calls (values of the other ones)."""
        return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                     for a in (args[i] for i in self.dynamic))


def _tensors_of(track: Track) -> list[torch.Tensor]:
    tensors = []
    for memory in track.slot.memories:
        saved = memory.saved
        tensors += [t for t in (saved.entry, saved.residual, saved.slope, saved.curvature) if t is not None]
        if saved.rows is not None:
            tensors += list(saved.rows)
    for kept in track.slot.sums.values():
        tensors += [t for t in (kept.residual, kept.slope, kept.curvature) if t is not None]
    return tensors
