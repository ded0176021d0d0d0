"""Run and data paths: local paths or object-storage URLs, all through one path type (etils.epath.Path).

A pod's hosts share no disk, so a run folder (train.run_dir: config.yaml, metrics.jsonl, tensorboard/,
samples/, checkpoints/) and data (ArrayRecord folders, triplet lists, videos) may be URLs such as
gs://bucket/runs/x. `path()` turns either kind into an epath.Path: local paths go to the OS; gs:// (and s3://,
az://) to fsspec (gcsfs; tf.io.gfile instead where TensorFlow is installed). Checkpoints go through orbax,
which takes gs:// URLs (tensorstore's own GCS driver) or absolute local paths (`absolute()`), not s3://;
ArrayRecord shards are read by array_record's own GCS reader.

Object storage has no append and no rename: files that grow during a run (metrics.jsonl, TensorBoard events)
are written in a local folder and uploaded whole now and then and at close (`Mirror`); files that a library
writes under a local name (mp4 samples, ArrayRecord shards) are written locally and uploaded (`local_file`).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from typing import Iterator

from etils import epath

from insvie_jax.config import ConfigError

# The URL schemes epath maps to a filesystem, and the fsspec protocol each needs (when TensorFlow is absent).
URL_PROTOCOLS = {"gs": ("gcs", "gcsfs"), "s3": ("s3", "s3fs"), "az": ("az", "adlfs")}


class StorageError(ConfigError):
    """A path that cannot be used (unknown URL scheme, missing filesystem package); the message says the fix."""


def is_url(p: str | os.PathLike) -> bool:
    return "://" in os.fspath(p)


def _check_url(text: str) -> None:
    scheme = text.split("://", 1)[0]
    if scheme not in URL_PROTOCOLS:
        raise StorageError(f"{text}: unsupported URL scheme '{scheme}://'; use a local path or one of "
                           f"{', '.join(s + '://' for s in URL_PROTOCOLS)}")
    protocol, package = URL_PROTOCOLS[scheme]
    try:
        import fsspec

        fsspec.get_filesystem_class(protocol)
    except ImportError:
        try:
            import tensorflow  # noqa: F401 - epath reads URLs through tf.io.gfile when it is installed
        except ImportError:
            install = "'insvie-jax[gcs]'" if scheme == "gs" else package
            raise StorageError(f"{text}: {scheme}:// paths need the {package} package: pip install {install}") from None


def path(p: str | os.PathLike) -> epath.Path:
    """The path or URL `p` as an epath.Path (`/` joins, open, read_text, exists, iterdir, ... on any storage)."""
    if isinstance(p, epath.Path):
        return p
    text = os.fspath(p)
    if is_url(text):
        _check_url(text)
    return epath.Path(text)


def absolute(p: str | os.PathLike) -> epath.Path:
    """`path(p)`, made absolute when local (orbax and tensorstore want absolute local paths)."""
    return path(p) if is_url(p) else epath.Path(os.path.abspath(os.fspath(p)))


def makedirs(p: str | os.PathLike) -> epath.Path:
    """Creates local folder `p` (and its parents); object storage has no folders, so a URL is left as it is (no
    bucket-level call that an object-only permission would refuse). Returns path(p)."""
    folder = path(p)
    if not is_url(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def name(p: str | os.PathLike) -> str:
    """The last component of a path or URL."""
    return path(p).name


def write_text_whole(p: str | os.PathLike, text: str) -> None:
    """Writes a text file so that readers see all of it or none: a local tmp + rename; an object-storage
    write is whole already."""
    target = path(p)
    if is_url(target):
        target.write_text(text)
        return
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)


def csv_text(p: str | os.PathLike, errors: str = "strict") -> io.StringIO:
    """A UTF-8 text file as csv.reader wants it (like open(p, newline="", errors=errors)), from any storage."""
    return io.StringIO(path(p).read_bytes().decode("utf-8", errors=errors), newline="")


def size(p: str | os.PathLike) -> int:
    """A file's size in bytes (os.stat locally: epath's local stat also looks up the owner's name)."""
    return path(p).stat().length if is_url(p) else os.stat(os.fspath(p)).st_size


def readable(p: str | os.PathLike):
    """What a library that opens files (PyAV) can read `p` from: the local file name, or for a URL an in-memory
    file of the object's bytes (one video; read whole)."""
    if is_url(p):
        return io.BytesIO(path(p).read_bytes())
    return os.fspath(p)


def upload(local: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies local file `local` to `dst` in one write (an object appears whole or not at all)."""
    with open(local, "rb") as src, path(dst).open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 22)


@contextlib.contextmanager
def local_file(dst: str | os.PathLike) -> Iterator[str]:
    """A local file name under which to write `dst`: `dst` itself when local; for a URL, a temporary file that
    is uploaded to `dst` when the block ends without error."""
    if not is_url(dst):
        yield os.fspath(dst)
        return
    folder = tempfile.mkdtemp(prefix="insvie-upload-")
    try:
        local = os.path.join(folder, name(dst))
        yield local
        upload(local, dst)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Mirror:
    """A local folder that stands for `folder`: for a local `folder`, the folder itself; for a URL, a temporary
    folder whose new or changed files `sync()` uploads whole into `folder` (at most every `every_s` seconds
    unless forced). `resume` names files of `folder` copied down first, so that appending continues them."""

    def __init__(self, folder: str | os.PathLike, resume: tuple[str, ...] = (), every_s: float = 30.0):
        self.folder, self.every_s, self.remote = path(folder), every_s, is_url(folder)
        self.uploaded: dict[str, tuple[int, int]] = {}  # relative name -> (size, mtime_ns) at its last upload
        self.last_sync = time.monotonic()
        if not self.remote:
            self.local = os.fspath(folder)
            os.makedirs(self.local, exist_ok=True)
            return
        self.local = tempfile.mkdtemp(prefix="insvie-mirror-")
        for file in resume:
            if (self.folder / file).exists():
                with (self.folder / file).open("rb") as src, open(os.path.join(self.local, file), "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)

    def due(self) -> bool:
        """Whether a remote folder's last upload is `every_s` old."""
        return self.remote and time.monotonic() - self.last_sync >= self.every_s

    def sync(self, force: bool = False) -> None:
        if not (force and self.remote or self.due()):
            return
        for root, _, files in os.walk(self.local):
            for file in files:
                local = os.path.join(root, file)
                relative = os.path.relpath(local, self.local)
                info = os.stat(local)
                if self.uploaded.get(relative) != (info.st_size, info.st_mtime_ns):
                    upload(local, self.folder / relative)
                    self.uploaded[relative] = (info.st_size, info.st_mtime_ns)
        self.last_sync = time.monotonic()

    def close(self) -> None:
        """Uploads what changed and removes the local folder (for a URL)."""
        if self.remote:
            self.sync(force=True)
            shutil.rmtree(self.local, ignore_errors=True)
