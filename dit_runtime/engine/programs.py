"""Compiled step programs saved whole, so that a restart skips torch.compile's tracing.

With a ``compile_cache_dir``, inductor's caches (FX graphs, Triton kernels) already spare a restart the code
generation, but a new process still runs Dynamo over each step function and AOTAutograd to find its cache key. For
``dit-10l`` on an H200 that is 2.5-3 s per program with every kernel found in the cache. torch's ahead-of-time
compile (``torch.compile(fn).aot_compile``, loaded with ``torch.compiler.load_compiled_function``; experimental
since torch 2.10) saves the traced program itself with its guards, and loading it is a deserialisation.

A store is one directory per fingerprint under ``<compile_cache_dir>/programs/``. The fingerprint hashes what a
program depends on that its guards may not check: the versions of Python and torch, the device (GPU model, or the
CPU's vector ISA that inductor's C++ targets), the model's config, the engine settings that shape the step, and the
source of ``dit_runtime``. Within it each program is a file named after its part and bucket. A file that fails to
load, or whose guards refuse the call it is for, is compiled again and replaced. A program torch cannot compile ahead
of time, or whose saved form refuses the very call it was compiled for (checked once, right after saving), is marked
so (``<name>.jit``, holding the reason), and later starts take it through the ordinary ``torch.compile`` call: traced
again, its kernels from inductor's cache once one start has put them there. Each such start logs a warning naming the
marker, which an operator deletes to have the next start try again (a failure may have been passing: memory, say).

Programs are compiled and called under ``torch.no_grad()``: their guards record the grad mode and the tensors'
dispatch keys, and inference mode hides the autograd keys from the check of a loaded program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the dit_runtime package


def aot_compile_enabled() -> contextlib.AbstractContextManager:
    """Around ``torch.compile(...)`` and ``.aot_compile``: torch 2.10 and 2.11 give a compiled function its
    ``aot_compile`` only under this flag (later versions always)."""
    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        return torch._dynamo.config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


def source_digest(root: Path = _SOURCE_ROOT) -> str:
    """A hash of every Python file of ``root``: what the traced functions may call."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def device_identity(device: torch.device) -> dict:
    """What compiled code for ``device`` is specific to."""
    if device.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(device), "capability": torch.cuda.get_device_capability(device),
                "cuda": torch.version.cuda}
    return {"cpu": torch.backends.cpu.get_cpu_capability()}


class ProgramStore:
    """Ahead-of-time compiled programs of one runner, saved in and loaded from one directory."""

    def __init__(self, directory: Path, identity: dict):
        """``identity``: everything the programs depend on (JSON-serialisable); its hash names the directory."""
        identity = {"python": sys.version_info[:2], "torch": torch.__version__, **identity,
                    "source": source_digest()}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=_jsonable).encode()).hexdigest()[:20]
        self.directory = Path(directory) / key
        self.loaded = self.compiled = 0
        self._programs: dict[str, Callable] = {}  # by file name, as loaded or compiled by this process
        self._unreadable: set[str] = set()

    @staticmethod
    def supported(fn: Callable) -> bool:
        """Whether ``fn`` (the result of ``torch.compile(..., fullgraph=True)``) can be compiled ahead of time."""
        return callable(getattr(fn, "aot_compile", None)) and hasattr(torch.compiler, "load_compiled_function")

    def program(self, part: str, tag: str, compiled: Callable, owner: object, *args) -> Callable[..., object]:
        """``compiled`` (a ``torch.compile``d bound method of ``owner``) for ``args``, as a program taking ``args``:
        the first program of ``part`` whose guards accept them (``<part>-<tag>`` first: a symbolic size makes one
        program serve several tags), else compiled now and saved as ``<part>-<tag>``. Where torch cannot compile it
        ahead of time, ``compiled`` itself."""
        own = f"{part}-{tag}"
        marker = self.directory / f"{own}.jit"
        if marker.is_file():  # an earlier start found it cannot be saved: as torch.compile
            log.warning("%s is traced at every start (%s); delete %s to try saving it again", own,
                        _read(marker) or "no reason recorded", marker)
            return compiled
        names = sorted({*self._programs, *(p.stem for p in self.directory.glob("*.bin"))} - self._unreadable)
        for name in [own] + [n for n in names if n.rpartition("-")[0] == part and n != own]:
            aot = self._get(name, owner)
            if aot is not None:
                with torch.no_grad():
                    if aot.guard_check(owner, *args):
                        return partial(aot, owner)
        try:
            # Floats read from modules (math.pi) as constants: a symbolic one is guarded through the module's global,
            # which torch leaves out of a saved program's guards, so a loaded program would refuse every call.
            with torch.no_grad(), aot_compile_enabled(), torch._dynamo.config.patch(specialize_float=True):
                aot = compiled.aot_compile((args, {}))
        except Exception as e:  # a construct torch cannot serialise: traced at every start instead
            log.warning("cannot compile %s ahead of time, so every start traces it again: %r", own, e)
            self._mark_jit(own, f"it cannot be compiled ahead of time: {e!r}")
            return compiled
        path = self.directory / f"{own}.bin"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            aot.save_compiled_function(str(path))
        except Exception as e:  # a full or read-only disk: this process runs the program anyway
            log.warning("could not save the compiled program %s: %r", path, e)
        else:  # what the next start will see: a saved program that refuses the call it was made for is no use
            saved = self._load(path, owner)
            with torch.no_grad():
                if saved is None or not saved.guard_check(owner, *args):
                    log.warning("the saved program %s refuses the call it was compiled for: later starts trace "
                                "it as torch.compile does", path)
                    path.unlink(missing_ok=True)
                    self._mark_jit(own, "its saved program refused the call it was compiled for")
        self.compiled += 1
        self._programs[own] = aot
        self._unreadable.discard(own)
        return partial(aot, owner)

    def _mark_jit(self, name: str, reason: str) -> None:
        """Later starts take ``name`` through torch.compile (inductor's caches), not ahead of time, and say why."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / f"{name}.jit").write_text(reason[:2000])
        except OSError:
            pass

    def _get(self, name: str, owner: object) -> Callable | None:
        """The program ``name``: as this process has it, else loaded from its file (None if it has none)."""
        if name in self._programs or name in self._unreadable:
            return self._programs.get(name)
        path = self.directory / f"{name}.bin"
        if not path.is_file():
            return None
        aot = self._load(path, owner)
        if aot is None:  # compiled again, and the file replaced, when a call needs it
            self._unreadable.add(name)
            return None
        self.loaded += 1
        self._programs[name] = aot
        return aot

    @staticmethod
    def _load(path: Path, owner: object) -> Callable | None:
        try:
            with open(path, "rb") as f:  # the globals its code reads: the owner's module's
                return torch.compiler.load_compiled_function(f, f_globals=vars(sys.modules[type(owner).__module__]))
        except Exception as e:  # another torch, a truncated file
            log.warning("could not load the compiled program %s: %r", path, e)
            return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)
