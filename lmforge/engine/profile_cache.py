"""Memory profiles kept on disk: the activation peak that engine.profile measured for one (model config, dtype,
device, step size, block size, torch/Triton versions, lmforge source) is reused by later starts, which then skip
the profile step. Any change to one of these, lmforge's own code included, is another key, so a profile is only
reused for the very step it measured. Files: `~/.cache/lmforge/profile/<key>.json` ($XDG_CACHE_HOME)."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from .startup import lmforge_cache_dir

logger = logging.getLogger(__name__)
_source_digest: str | None = None


def _lmforge_source_digest() -> str:
    """sha256 over the package's .py files (paths and contents): any code change is a new key."""
    global _source_digest
    if _source_digest is None:
        import lmforge

        root = os.path.dirname(os.path.abspath(lmforge.__file__))
        h = hashlib.sha256()
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
        _source_digest = h.hexdigest()
    return _source_digest


def _device_identity(device: torch.device) -> list:
    props = torch.cuda.get_device_properties(device)
    return [props.name, props.total_memory, torch.version.cuda]


def profile_key(hf_config, dtype: torch.dtype, device: torch.device, num_tokens: int, block_size: int) -> str:
    config = {k: v for k, v in hf_config.to_dict().items() if k not in ("_name_or_path", "name_or_path")}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    parts = dict(
        config=config,
        dtype=str(dtype),
        device=_device_identity(device),
        num_tokens=num_tokens,
        block_size=block_size,
        torch=torch.__version__,
        triton=triton_version,
        lmforge=_lmforge_source_digest(),
    )
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _path(key: str) -> str:
    return os.path.join(lmforge_cache_dir(), "profile", f"{key}.json")


def load_profile(key: str) -> tuple[int, int] | None:
    """(activation peak bytes, device memory the step took outside torch's allocator), or None: not measured
    yet, or a file that cannot be read (the profile then runs again and rewrites it)."""
    try:
        with open(_path(key)) as f:
            data = json.load(f)
        peak, outside = int(data["peak_bytes"]), int(data["outside_allocator_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if peak < 0 or outside < 0:
        return None
    return peak, outside


def store_profile(key: str, peak: int, outside: int) -> None:
    """Written through a temporary file and a rename, so a concurrent start never reads half a file; a folder
    that cannot be written only costs the next start its profile step."""
    path = _path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(peak_bytes=int(peak), outside_allocator_bytes=int(outside)), f)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("memory profile not cached (%s); the next start measures it again", e)
