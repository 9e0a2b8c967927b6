"""``checkpoints/manifest.json``: the sha256 and size of every served checkpoint, checked before a replica loads one.

    python -m serving.manifest checkpoints/            # (re)write checkpoints/manifest.json from the files there
    python -m serving.manifest --check checkpoints/    # verify every listed file; exit 1 naming the bad ones

The manifest sits beside the checkpoints and names them relative to its folder::

    {"format": "dit-serve-manifest/1",
     "files": {"digits-s.safetensors": {"sha256": "9f2c...", "bytes": 1234567}}}

A file that is missing, of the wrong size (truncated) or whose sha256 differs is refused with a CheckpointError
naming it; the model deployment then reports unhealthy with that message and the other models keep serving.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dit_runtime.checkpoint import CheckpointError, sha256_of, verify_sha256

MANIFEST_NAME = "manifest.json"
FORMAT = "dit-serve-manifest/1"
WRITE_HINT = "run `python -m serving.manifest {folder}` after checking the files are the ones you mean to serve"


def manifest_path(checkpoint: str | os.PathLike) -> Path:
    """Where the manifest of a checkpoint lives: ``manifest.json`` in the checkpoint's folder."""
    return Path(checkpoint).resolve().parent / MANIFEST_NAME


def write_manifest(folder: str | os.PathLike, pattern: str = "*.safetensors") -> Path:
    """Hash every checkpoint in ``folder`` and write its manifest atomically (tmp + rename); return its path."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise CheckpointError(f"no {pattern} files in {folder.resolve()}: nothing to put in a manifest")
    entries = {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in files}
    out = folder / MANIFEST_NAME
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, "files": entries}, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, dict]:
    """The ``files`` entries of a manifest; CheckpointError naming the manifest when it is absent or malformed."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no checksum manifest {path}; {WRITE_HINT.format(folder=path.parent)}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checksum manifest {path} is unreadable: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("files"), dict):
        raise CheckpointError(f"checksum manifest {path} is not a {FORMAT} file (want "
                              '{"format": ..., "files": {name: {"sha256", "bytes"}}}); ' + WRITE_HINT.format(
                                  folder=path.parent))
    return raw["files"]


def verify_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Raise a CheckpointError naming the file unless it exists, is listed, and has the listed size and sha256."""
    checkpoint = Path(checkpoint).resolve()
    manifest = manifest_path(checkpoint)
    entry = read_manifest(manifest).get(checkpoint.name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise CheckpointError(f"{checkpoint}: not listed in {manifest}; {WRITE_HINT.format(folder=manifest.parent)}")
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint} (listed in {manifest})")
    size = checkpoint.stat().st_size
    if entry.get("bytes") is not None and size != entry["bytes"]:
        raise CheckpointError(f"{checkpoint}: {size} bytes but {manifest} records {entry['bytes']}; the file is "
                              "truncated or was replaced")
    verify_sha256(checkpoint, entry["sha256"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.manifest", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", default=["checkpoints"], help="folders of .safetensors checkpoints")
    parser.add_argument("--check", action="store_true", help="verify the files against the existing manifest")
    args = parser.parse_args(argv)
    bad = 0
    for folder in map(Path, args.folders):
        started = time.perf_counter()
        if args.check:
            for name in read_manifest(folder / MANIFEST_NAME):
                try:
                    verify_checkpoint(folder / name)
                    print(f"ok   {folder / name}")
                except CheckpointError as e:
                    bad += 1
                    print(f"BAD  {e}")
        else:
            out = write_manifest(folder)
            files = read_manifest(out)
            total = sum(e["bytes"] for e in files.values())
            print(f"wrote {out}: {len(files)} files, {total / 1e6:.1f} MB hashed in "
                  f"{time.perf_counter() - started:.1f} s")
            for name, e in files.items():
                print(f"  {e['sha256']}  {name}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
