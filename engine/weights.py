"""The official weight files: where they come from, where they live, and a verified, resumable download.

Registry (SHAP-E.md §1 and §7): the four Shap-E checkpoints under openaipublic.azureedge.net/main/shap-e/ with the
SHA-256 values of the official ``shap_e/models/download.py``, and OpenAI's CLIP ViT-L/14 file (its SHA-256 is the
hex folder name in its URL, which the ``clip`` package checks the same way).

Download protocol (``download``): bytes go to ``<file>.part``; an existing ``.part`` is resumed with an HTTP
Range request; the SHA-256 is checked before an atomic ``os.replace`` onto the final name, and a mismatching
``.part`` is deleted. Cancelling (``should_cancel``) or a broken connection keeps the ``.part`` for the next try.
Offline (argument or ``SHAP_E_OFFLINE=1``): nothing is fetched; the error says exactly what to download where.
Only urllib is used. No bpy, no open_clip here.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .records import EngineError, GenerationCancelled

CACHE_ENV = "SHAP_E_CACHE"
ADDON_CACHE_ENV = "SHAP_E_MODELS_DIR"  # set by the Blender add-on from its preferences
OFFLINE_ENV = "SHAP_E_OFFLINE"
APP_DIR = "shap_e_blender"
CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    sha256: str
    approx_bytes: int  # estimate (element count x bytes per element), for display and the free-space check
    alias: str
    description: str


_BASE = "https://openaipublic.azureedge.net/main/shap-e/"
_CLIP_SHA = "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"

REGISTRY: dict[str, WeightFile] = {f.filename: f for f in (
    WeightFile("text_cond.pt", _BASE + "text_cond.pt",
               "e6b4fa599a7b3c3b16c222d5f5fe56f9db9289ff0b6575fbe5c11bc97106aad4", 315_692_032 * 4,
               "text300M", "text-conditional latent diffusion prior"),
    WeightFile("image_cond.pt", _BASE + "image_cond.pt",
               "cb8072c64bbbcf6910488814d212227de5db291780d4ea99c6152f9346cf12aa", 315_956_224 * 4,
               "image300M", "image-conditional latent diffusion prior"),
    WeightFile("vector_decoder.pt", _BASE + "vector_decoder.pt",
               "d7e7ebbfe3780499ae89b2da5e7c1354012dba5a6abfe295bed42f25c3be1b98", 226_297_289 * 4,
               "decoder", "latent -> implicit field decoder"),
    WeightFile("transmitter.pt", _BASE + "transmitter.pt",
               "af02a0b85a8abdfb3919584b63c540ba175f6ad4790f574a7fef4617e5acdc3b", 443_991_776 * 4,
               "transmitter", "mesh encoder + decoder"),
    WeightFile("ViT-L-14.pt", f"https://openaipublic.azureedge.net/clip/models/{_CLIP_SHA}/ViT-L-14.pt",
               _CLIP_SHA, 427_616_513 * 2, "clip", "OpenAI CLIP ViT-L/14 (fp16)"),
)}
ALIASES = {f.alias: f.filename for f in REGISTRY.values()}
BUNDLES = {
    "text300M": ("text_cond.pt", "vector_decoder.pt", "ViT-L-14.pt"),
    "image300M": ("image_cond.pt", "vector_decoder.pt", "ViT-L-14.pt"),
    "decoder": ("vector_decoder.pt",),
    "transmitter": ("transmitter.pt",),
    "clip": ("ViT-L-14.pt",),
    "all": tuple(REGISTRY),
}

Progress = Callable[[int, int], None]


def cache_dir() -> Path:
    """$SHAP_E_CACHE, else the add-on's models folder ($SHAP_E_MODELS_DIR), else the platform's user cache."""
    for env in (CACHE_ENV, ADDON_CACHE_ENV):
        if os.environ.get(env):
            return Path(os.environ[env]).expanduser()
    home = Path.home()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")
    return base / APP_DIR


def is_offline(offline: bool | None = None) -> bool:
    return bool(offline) or os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def resolve(name: str) -> WeightFile:
    """A registry entry by file name ('text_cond.pt') or alias ('text300M', 'decoder', 'clip', ...)."""
    entry = REGISTRY.get(name) or REGISTRY.get(ALIASES.get(name, ""))
    if entry is None:
        raise EngineError(f"unknown weights file {name!r}",
                          f"choose one of: {', '.join([*ALIASES, *REGISTRY])}")
    return entry


def manual_instructions(url: str, sha256: str, dest: Path) -> str:
    return (f"download {url} with a browser or 'curl -L -o \"{dest}\" {url}', check that its SHA-256 is "
            f"{sha256}, and save it as {dest}")


# ----------------------------------------------------------------------------------------------------------------
# Hashing


def sha256_file(path: Path, *, should_cancel: Callable[[], bool] | None = None, h=None) -> "hashlib._Hash":
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled()
            h.update(block)
    return h


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path, digest: str) -> str:
    st = path.stat()
    return f"{digest} {st.st_size} {st.st_mtime_ns}\n"


def verify_file(path: Path, sha256: str, *, should_cancel=None) -> bool:
    """True if ``path`` has this SHA-256. The result is remembered in ``<file>.sha256`` (digest, size, mtime) so
    that a 1 GB file is hashed once, not at every load."""
    stamp = _stamp_path(path)
    try:
        if stamp.read_text() == _stamp(path, sha256):
            return True
    except OSError:
        pass
    digest = sha256_file(path, should_cancel=should_cancel).hexdigest()
    if digest != sha256:
        return False
    try:
        stamp.write_text(_stamp(path, digest))
    except OSError:
        pass
    return True


# ----------------------------------------------------------------------------------------------------------------
# Download


def _report(progress, done: int, total: int, delta: int) -> None:
    if progress is None:
        return
    if hasattr(progress, "update"):  # a tqdm bar
        if getattr(progress, "total", None) in (None, 0) and total:
            progress.total = total
        progress.update(delta)
    else:
        progress(done, total)


def download(url: str, dest: str | Path, *, sha256: str, size: int | None = None, progress: Progress | None = None,
             should_cancel: Callable[[], bool] | None = None, offline: bool | None = None, retries: int = 2,
             timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``dest`` (verified against ``sha256``). Resumes ``dest.part``; see the module docstring.

    progress: ``progress(done_bytes, total_bytes)`` (total 0 when unknown) or a tqdm-like object with
    ``update(n)``. should_cancel: polled between chunks; True raises GenerationCancelled (the .part is kept).
    retries: automatic resumes after a broken connection before giving up with an EngineError.
    """
    dest = Path(dest)
    if is_offline(offline):
        raise EngineError(f"{dest.name} is not downloaded and downloads are off (offline mode)",
                          manual_instructions(url, sha256, dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _fetch(url, part, size=size, progress=progress, should_cancel=should_cancel, timeout=timeout)
            break
        except _Interrupted as err:
            attempt += 1
            if attempt > retries:
                got = part.stat().st_size if part.exists() else 0
                raise EngineError(f"the download of {dest.name} was interrupted after {got / 1e6:.1f} MB ({err})",
                                  "check the connection and run the download again: it resumes where it stopped; "
                                  "or " + manual_instructions(url, sha256, dest)) from err
    digest = sha256_file(part, should_cancel=should_cancel).hexdigest()
    if digest != sha256:
        part.unlink(missing_ok=True)
        raise EngineError(f"the downloaded {dest.name} has SHA-256 {digest}, expected {sha256}; it was deleted",
                          "run the download again; if this repeats, something between you and the server alters "
                          "the file: " + manual_instructions(url, sha256, dest))
    os.replace(part, dest)
    try:
        _stamp_path(dest).write_text(_stamp(dest, digest))
    except OSError:
        pass
    return dest


class _Interrupted(Exception):
    pass


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "shap-e-blender"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return None  # the .part already holds everything the server has
        raise EngineError(f"the server answered {err.code} {err.reason} for {url}",
                          "check the address; the file may have moved") from err
    except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise EngineError(f"could not connect to download {url} ({reason})",
                          "check the internet connection (and Blender's 'Allow Online Access')") from err


def _fetch(url: str, part: Path, *, size, progress, should_cancel, timeout) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    resp = _open(url, offset, timeout)
    if resp is None:
        return
    with resp:
        status = getattr(resp, "status", 200)
        if offset and status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                raise EngineError(f"the server resumed {url} at the wrong offset", "delete the .part file and retry")
            mode = "ab"
        else:  # no resume (fresh start, or the server ignored Range): start over
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else (size or 0)
        if total:
            free = shutil.disk_usage(part.parent).free
            if free < total - offset:
                raise EngineError(f"not enough disk space for {part.name[:-5]}: {(total - offset) / 1e9:.2f} GB "
                                  f"needed, {free / 1e9:.2f} GB free in {part.parent}",
                                  f"free some space or set {CACHE_ENV} to a folder on another disk")
        done = offset
        _report(progress, done, total, 0)
        with open(part, mode) as fh:
            while True:
                if should_cancel is not None and should_cancel():
                    raise GenerationCancelled()
                try:
                    block = resp.read(CHUNK)
                except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as err:
                    raise _Interrupted(str(err) or type(err).__name__) from err
                if not block:
                    break
                fh.write(block)
                done += len(block)
                _report(progress, done, total, len(block))
        if total and done < total:
            raise _Interrupted(f"connection closed at {done} of {total} bytes")


def ensure_file(name: str, *, offline: bool | None = False, progress: Progress | None = None,
                should_cancel: Callable[[], bool] | None = None, directory: str | Path | None = None) -> Path:
    """Path of a registry file in the cache (``directory`` overrides), downloading and verifying it if needed.

    An existing file with a wrong SHA-256 is an EngineError (it is not deleted: it may be the user's own copy).
    """
    entry = resolve(name)
    dest = Path(directory) if directory is not None else cache_dir()
    dest = dest / entry.filename
    if dest.is_file():
        if verify_file(dest, entry.sha256, should_cancel=should_cancel):
            return dest
        raise EngineError(f"{dest} exists but its SHA-256 is not the official {entry.sha256}",
                          "delete it (it is damaged or another file) and download it again, or "
                          + manual_instructions(entry.url, entry.sha256, dest))
    return download(entry.url, dest, sha256=entry.sha256, progress=progress, should_cancel=should_cancel,
                    offline=offline)


def ensure_files_for(name: str, *, offline: bool | None = False, progress: Progress | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> list[Path]:
    """All files a model or group needs: text300M, image300M, decoder, transmitter, clip or all."""
    if name not in BUNDLES:
        files = (resolve(name).filename,)
    else:
        files = BUNDLES[name]
    return [ensure_file(f, offline=offline, progress=progress, should_cancel=should_cancel) for f in files]


__all__ = ["REGISTRY", "WeightFile", "cache_dir", "download", "ensure_file", "ensure_files_for", "resolve",
           "verify_file", "sha256_file", "is_offline", "manual_instructions"]
