"""Which path an op takes: the native kernel or its torch reference.

CPU kernels are used whenever the extension is built (OMNI_EDGE_NATIVE=0, or knobs.set("native", False),
forces the torch references everywhere; see omni_edge/knobs.py). CUDA kernels may meet their first GPU on a user's machine, so on first use per
device each family's `self_check(device)` (defined in `omni_edge.ops.<family>`) runs its native kernels
against the torch references on small random inputs. A family that disagrees is switched off for that GPU
with one warning and the torch path is used. Results are cached per GPU model and package version in
`<cache folder>/selfcheck.json` (knobs: OMNI_EDGE_CACHE, default `~/.cache/omni_edge`).
"""

from __future__ import annotations

import importlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch

from omni_edge import __version__
from omni_edge import _native, knobs

FAMILIES = ("q4", "attention", "rvq")

_lock = threading.Lock()
_results: Dict[str, Dict[str, dict]] = {}  # gpu key -> family -> {"ok": bool, "error": str}


def cache_dir() -> Path:
    return knobs.settings().cache_dir


def _cache_file() -> Path:
    return cache_dir() / "selfcheck.json"


def gpu_key(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return f"{props.name}|sm_{props.major}{props.minor}|omni-edge {__version__}"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(key: str, result: Dict[str, dict]) -> None:
    data = _load_cache()
    data[key] = result
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home must not stop inference; the check just reruns next time


def native_requested() -> bool:
    return knobs.settings().native and _native.available()


def run_self_check(device: torch.device, families=FAMILIES) -> Dict[str, dict]:
    """Run each family's self-check on `device` now (no cache). Returns family -> {"ok", "error"}."""
    out: Dict[str, dict] = {}
    for fam in families:
        module = importlib.import_module(f"omni_edge.ops.{fam}")
        check = getattr(module, "self_check", None)
        if check is None:
            out[fam] = {"ok": False, "error": "no self_check defined"}
            continue
        try:
            with force_native():
                check(device)
            out[fam] = {"ok": True, "error": ""}
        except Exception as e:  # any failure means: do not trust this kernel on this device
            out[fam] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return out


def _gpu_results(device: torch.device) -> Dict[str, dict]:
    key = gpu_key(device)
    with _lock:
        if key in _results:
            return _results[key]
        cached = _load_cache().get(key)
        if cached is None or set(cached) != set(FAMILIES):
            cached = run_self_check(device)
            _store_cache(key, cached)
        for fam, r in cached.items():
            if not r["ok"]:
                warnings.warn(
                    f"omni-edge: the native CUDA '{fam}' kernels failed their self-check on {key} "
                    f"({r['error']}); using the torch reference path for them",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _results[key] = cached
        return cached


def native_enabled(family: str, device: torch.device) -> bool:
    """True when `family`'s native kernel should run on `device`."""
    if not native_requested():
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    if not _native.lib().build_info()["cuda_compiled"]:
        return False
    if _checking.active:
        return True  # a self-check is running: exercise the native kernels it is checking
    return _gpu_results(device)[family]["ok"]


class _Checking(threading.local):
    active = False


_checking = _Checking()


class force_native:
    """Context manager used by self-checks and tests: native kernels on, whatever the cache says."""

    def __enter__(self):
        self._prev = _checking.active
        _checking.active = True

    def __exit__(self, *exc):
        _checking.active = self._prev
        return False


def reset(device: Optional[torch.device] = None) -> None:
    """Forget in-process self-check results: of `device`'s GPU model only, or of every GPU (None)."""
    with _lock:
        if device is None or torch.device(device).type != "cuda":
            if device is None:
                _results.clear()
            return
        _results.pop(gpu_key(torch.device(device)), None)
