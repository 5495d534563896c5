"""A deployment bundle's ``manifest.json``: its schema, its integrity record, and the one check run on load.

`t4dopt.export.bundle` writes the manifest with `write`; `t4dopt.deploy.load` reads it with `read`,
which refuses, with a `BundleError` naming the file and the field, anything that would make a
loaded bundle compute other numbers than the model it was exported from:

- a field of the wrong type or value (every field has a check here; the cache schedule has the
  backend's own, `t4dopt.options.cache_spec`);
- an edited manifest: the integrity record holds a SHA-256 of each field (the program, the
  artifacts, the cache schedule, ...), so swapped artifact names or an edited chain are caught;
- a damaged, swapped or replaced artifact file: the record holds a SHA-256 of each file's bytes.

The record guards against accidents (a copy cut short, files mixed between bundles, a hand
edit), not against someone who rewrites the record too. Manifests of format 1 (before the record)
still load, with a `T4DWarning`. To run a bundle with another cache schedule, pass ``cache=`` to
`t4dopt.deploy.load` rather than editing the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch

import t4dopt
from t4dopt.cache.program import Program, UnitSpec
from t4dopt.errors import BundleError, T4DOptionError, T4DWarning
from t4dopt.input_specs import InputSpec
from t4dopt.options import CACHE_KEYS, cache_spec

FORMAT = 2
"""The format `write` writes; 2 added the integrity record."""
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
INTEGRITY = "integrity"
SEALED = ("format", "versions", "model", "inputs", "program", "artifacts", "cache", "layout", "sites")
"""The fields the integrity record holds a hash of: all but the record itself."""
REQUIRED = ("format", "versions", "inputs", "program", "artifacts", "cache")
ARTIFACT_ROLES = ("plain", "full", "pruned")
"""A segment's programs: as traced, and a token-pruned unit's full and pruned variants (both or neither)."""


def _digest(value: Any) -> str:
    """SHA-256 of `value` as canonical JSON (sorted keys, no spaces): the same for the value read back."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_digest(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest` (every field of `SEALED` that applies) to ``folder/manifest.json`` with its integrity record."""
    manifest = json.loads(json.dumps({"format": FORMAT, **manifest}))  # hash what will be read back
    files = sorted({name for files in manifest["artifacts"] for name in files.values()})
    manifest[INTEGRITY] = {"algorithm": "sha256",
                           "fields": {key: _digest(manifest[key]) for key in SEALED if key in manifest},
                           "files": {name: file_digest(folder / name) for name in files}}
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False))
    return path


def read(folder: Path) -> dict[str, Any]:
    """The manifest of the bundle at `folder`, every field and file checked; `BundleError` otherwise."""
    if not folder.is_dir():
        raise BundleError(f"no bundle folder at {folder}", path=str(folder))
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} is not a t4dopt bundle: it has no {MANIFEST}", path=str(path))
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path} is not valid JSON: {error}", path=str(path)) from None
    _Schema(path).check(manifest)
    if manifest["format"] == 1:
        warnings.warn(f"{path} is bundle format 1, written before bundles carried an integrity record: its files "
                      "are not checked; export it again to have them checked", T4DWarning, stacklevel=3)
    else:
        _check_integrity(folder, path, manifest)
    return manifest


def _check_integrity(folder: Path, path: Path, manifest: dict[str, Any]) -> None:
    record = manifest[INTEGRITY]
    for key in SEALED:
        if key in manifest or key in record["fields"]:
            if key not in manifest or record["fields"].get(key) != _digest(manifest[key]):
                raise BundleError(f"{path}: field {key!r} differs from the one exported (its SHA-256 does not match "
                                  f"the integrity record): the manifest was edited; export the bundle again"
                                  + (", or pass cache= to t4dopt.deploy.load" if key == "cache" else ""),
                                  path=str(path), field=key)
    for name in sorted({name for files in manifest["artifacts"] for name in files.values()}):
        expected = record["files"].get(name)
        if expected is None:
            raise BundleError(f"{path}: artifact {name} has no SHA-256 in the integrity record", path=str(path),
                              field=f"{INTEGRITY}.files")
        if file_digest(folder / name) != expected:
            raise BundleError(f"bundle {folder} is damaged: {name} is not the file exported (its SHA-256 does not "
                              "match the manifest's); copy or export the bundle again", path=str(folder / name))


class _Schema:
    """Every field of a manifest, checked; the first problem raises `BundleError` naming the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, problem: str) -> BundleError:
        return BundleError(f"{self.path}: field {field}: {problem}", path=str(self.path), field=field)

    def check(self, manifest: Any) -> None:
        if not isinstance(manifest, dict):
            raise BundleError(f"{self.path} holds {type(manifest).__name__}, not a manifest object; was it written "
                              "by t4dopt.export.bundle?", path=str(self.path))
        missing = [key for key in REQUIRED if key not in manifest]
        if missing:
            raise BundleError(f"{self.path} lacks {', '.join(missing)}; was it written by t4dopt.export.bundle?",
                              path=str(self.path), field=missing[0])
        fmt = manifest["format"]
        if isinstance(fmt, bool) or fmt not in READABLE_FORMATS:
            raise BundleError(f"{self.path} is bundle format {fmt!r}; this t4dopt reads formats "
                              f"{list(READABLE_FORMATS)}", path=str(self.path), field="format")
        known = SEALED + ((INTEGRITY,) if fmt >= 2 else ())
        unknown = sorted(set(manifest) - set(known))
        if unknown:
            raise self.fail(unknown[0], f"unknown field; a format {fmt} manifest has {list(known)}")
        if fmt >= 2 and INTEGRITY not in manifest:
            raise self.fail(INTEGRITY, "missing: a format 2 bundle records the SHA-256 of its fields and files")
        self.versions(manifest["versions"])
        self.inputs(manifest["inputs"])
        segments = self.program(manifest["program"])
        self.artifacts(manifest["artifacts"], segments)
        self.cache(manifest["cache"])
        for key, kind in (("model", str), ("layout", dict), ("sites", list)):
            if key in manifest and not isinstance(manifest[key], kind):
                raise self.fail(key, f"expected {kind.__name__}, got {type(manifest[key]).__name__}")
        if INTEGRITY in manifest:
            self.integrity(manifest[INTEGRITY])

    def versions(self, versions: Any) -> None:
        if not isinstance(versions, dict) or set(versions) != {"t4dopt", "torch"}:
            raise self.fail("versions", f"expected {{'t4dopt': version, 'torch': version}}, got {versions!r}")
        exported = {}
        for name in ("t4dopt", "torch"):
            exported[name] = _release(versions[name])
            if exported[name] is None:
                raise self.fail(f"versions.{name}", f"{versions[name]!r} is not a version")
        if exported["t4dopt"] > _release(t4dopt.__version__):
            raise self.fail("versions.t4dopt", f"written by t4dopt {versions['t4dopt']}, newer than this t4dopt "
                                               f"{t4dopt.__version__}: upgrade t4dopt to load it")
        if exported["torch"][:2] != _release(torch.__version__)[:2]:
            warnings.warn(f"{self.path}: exported with torch {versions['torch']}, loaded with torch "
                          f"{torch.__version__}: torch.export programs may not load, or compute the same, across "
                          "versions", T4DWarning, stacklevel=4)

    def inputs(self, inputs: Any) -> None:
        if not isinstance(inputs, list) or not inputs:
            raise self.fail("inputs", f"expected a non-empty list of inputs, got {inputs!r}")
        for index, item in enumerate(inputs):
            try:
                InputSpec.from_json(item)
            except ValueError as error:
                raise self.fail(f"inputs[{index}]", str(error)) from None
        names = [item["name"] for item in inputs]
        if len(set(names)) != len(names):
            raise self.fail("inputs", f"input names repeat: {names}")

    def program(self, program: Any) -> int:
        """Check the program's structure and that every value it names is defined before use; its segment count."""
        fields = {f.name for f in dataclasses.fields(Program)}
        if not isinstance(program, dict):
            raise self.fail("program", f"expected an object, got {type(program).__name__}")
        missing = sorted({"placeholders", "output_leaves", "output_spec", "timestep", "segments", "units",
                          "chains"} - set(program))
        if missing:
            raise self.fail(f"program.{missing[0]}", "missing")
        unknown = sorted(set(program) - fields)
        if unknown:
            raise self.fail(f"program.{unknown[0]}", f"unknown field; known: {sorted(fields)}")
        names = self.names("program.placeholders", program["placeholders"])
        defined = set(names)
        if not isinstance(program["output_spec"], str):
            raise self.fail("program.output_spec", "expected a string")
        if program["timestep"] is not None and program["timestep"] not in defined:
            raise self.fail("program.timestep", f"{program['timestep']!r} is none of the placeholders {names}")
        units = self.list_of("program.units", program["units"])
        for index, unit in enumerate(units):
            self.unit(f"program.units[{index}]", unit)
        segments = self.list_of("program.segments", program["segments"])
        if not segments:
            raise self.fail("program.segments", "empty")
        for index, segment in enumerate(segments):
            where = f"program.segments[{index}]"
            if not isinstance(segment, dict) or not {"inputs", "outputs"} <= set(segment) \
                    or not set(segment) <= {"inputs", "outputs", "unit", "token"}:
                raise self.fail(where, f"expected {{'inputs': [...], 'outputs': [...], 'unit': index or null}}, "
                                       f"got {segment!r}")
            for name in self.names(f"{where}.inputs", segment["inputs"]):
                if name not in defined:
                    raise self.fail(f"{where}.inputs", f"{name!r} is not computed before this segment")
            defined.update(self.names(f"{where}.outputs", segment["outputs"]))
            unit = segment.get("unit")
            if unit is not None and not self.is_index(unit, len(units)):
                raise self.fail(f"{where}.unit", f"{unit!r} is not a unit index (there are {len(units)} units)")
        for index, unit in enumerate(units):
            for end in ("entry", "exit"):
                if unit[end] not in defined:
                    raise self.fail(f"program.units[{index}].{end}", f"{unit[end]!r} is computed by no segment")
        for index, leaf in enumerate(self.list_of("program.output_leaves", program["output_leaves"])):
            if isinstance(leaf, dict) and (set(leaf) != {"value"} or leaf["value"] not in defined):
                raise self.fail(f"program.output_leaves[{index}]", f"{leaf!r} names no computed value")
        seen: set[int] = set()
        for index, chain in enumerate(self.list_of("program.chains", program["chains"])):
            if (not isinstance(chain, list) or len(chain) < 2 or not all(self.is_index(u, len(units)) for u in chain)
                    or chain != sorted(chain) or seen & set(chain) or len(set(chain)) != len(chain)):
                raise self.fail(f"program.chains[{index}]", f"{chain!r}: expected two or more unit indices in order, "
                                                            "each unit in one chain at most")
            seen.update(chain)
        if "mutates" in program and not isinstance(program["mutates"], bool):
            raise self.fail("program.mutates", "expected true or false")
        if "work" in program:
            self.flops("program.work", program["work"])
        return len(segments)

    def flops(self, where: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise self.fail(where, f"{value!r}: expected a number >= 0")

    def unit(self, where: str, unit: Any) -> None:
        keys = {f.name for f in dataclasses.fields(UnitSpec)}
        if not isinstance(unit, dict) or not {"name", "kind", "entry", "exit", "flops"} <= set(unit) \
                or not set(unit) <= keys:
            raise self.fail(where, f"expected an object with {sorted(keys)}, got {unit!r}")
        for key in ("name", "kind", "entry", "exit"):
            if not isinstance(unit[key], str):
                raise self.fail(f"{where}.{key}", f"expected a string, got {unit[key]!r}")
        self.flops(f"{where}.flops", unit["flops"])
        if "work" in unit:
            self.flops(f"{where}.work", unit["work"])
        share = unit.get("token_share")
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not 0 < share <= 1):
            raise self.fail(f"{where}.token_share", f"{share!r}: expected null or a number in (0, 1]")

    def artifacts(self, artifacts: Any, segments: int) -> None:
        artifacts = self.list_of("artifacts", artifacts)
        if len(artifacts) != segments:
            raise self.fail("artifacts", f"{len(artifacts)} artifacts for {segments} segments")
        for index, files in enumerate(artifacts):
            where = f"artifacts[{index}]"
            if not isinstance(files, dict) or "plain" not in files or not set(files) <= set(ARTIFACT_ROLES) \
                    or ("full" in files) != ("pruned" in files):
                raise self.fail(where, f"expected {{'plain': file}} or {{'plain', 'full', 'pruned'}}, got {files!r}")
            for role, name in files.items():
                if not isinstance(name, str) or not name.endswith(".pt2") or Path(name).name != name \
                        or name.startswith("."):
                    raise self.fail(f"{where}.{role}", f"{name!r}: expected a .pt2 file name inside the bundle")
                if not (self.path.parent / name).is_file():
                    raise BundleError(f"bundle {self.path.parent} is incomplete: {name} is missing",
                                      path=str(self.path.parent / name), field=f"{where}.{role}")
        names = [name for files in artifacts for name in files.values()]
        if len(set(names)) != len(names):
            raise self.fail("artifacts", "a file is named twice")

    def cache(self, cache: Any) -> None:
        if not isinstance(cache, dict):
            raise self.fail("cache", f"expected an object, got {type(cache).__name__}")
        unknown = sorted(set(cache) - set(CACHE_KEYS))
        if unknown:
            raise self.fail(f"cache.{unknown[0]}", f"unknown cache setting; known: {list(CACHE_KEYS)}")
        try:
            cache_spec(cache, name=lambda key: f"cache.{key}")
        except T4DOptionError as error:
            raise self.fail(error.option or "cache", f"{error.value!r} is not valid; allowed: {error.allowed}") \
                from None

    def integrity(self, record: Any) -> None:
        if not isinstance(record, dict) or record.get("algorithm") != "sha256" \
                or set(record) != {"algorithm", "fields", "files"}:
            raise self.fail(INTEGRITY, "expected {'algorithm': 'sha256', 'fields': {...}, 'files': {...}}")
        for part in ("fields", "files"):
            digests = record[part]
            if not isinstance(digests, dict) or not all(isinstance(d, str) and len(d) == 64 for d in digests.values()):
                raise self.fail(f"{INTEGRITY}.{part}", "expected an object of SHA-256 hex digests")

    def list_of(self, field: str, value: Any) -> list:
        if not isinstance(value, list):
            raise self.fail(field, f"expected a list, got {type(value).__name__}")
        return value

    def names(self, field: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
            raise self.fail(field, f"expected a list of value names, got {value!r}")
        return value

    @staticmethod
    def is_index(value: Any, length: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < length


def _release(version: Any) -> tuple[int, ...] | None:
    """The release numbers of a version string (``"2.13.0+cpu"`` -> ``(2, 13, 0)``), None if it is not one."""
    match = re.fullmatch(r"(\d+(?:\.\d+)*)([.+-]?[0-9A-Za-z.+-]*)", version) if isinstance(version, str) else None
    return tuple(int(part) for part in match.group(1).split(".")) if match else None
