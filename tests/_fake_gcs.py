"""An offline stand-in for Google Cloud Storage, so that gs:// run and data folders are tested through the
code paths a pod uses.

One folder (`root`, objects as files root/<bucket>/<name>) is served two ways:
- over HTTP as the subset of the GCS JSON API that tensorstore (orbax checkpoints; TENSORSTORE_GCS_HTTP_URL),
  array_record's GCS reader (google-cloud-cpp; CLOUD_STORAGE_EMULATOR_ENDPOINT) and google-cloud-storage
  (orbax's bucket lookup; STORAGE_EMULATOR_HOST) call: object media reads (ranges, generation preconditions),
  object and bucket metadata, media uploads, deletes, prefix listings;
- as the fsspec protocol "gcs", which etils.epath uses for gs:// paths (gcsfs in production): a local
  filesystem under `root` that, like GCS, refuses to append.
An object's generation is its file's mtime in ns. `install(root)` registers the filesystem and sets the
environment variables in this process; `sitecustomize.py` does it in subprocesses (FAKE_GCS_ROOT/_URL).
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

BUCKET = "insvie-test"


def _generation(file: str) -> int:
    return os.stat(file).st_mtime_ns


_last_generation = [0]


def _new_generation(file: str) -> None:
    """Gives an object the server wrote a generation above every earlier one (mtime is coarser than writes)."""
    generation = max(time.time_ns(), _last_generation[0] + 1)
    _last_generation[0] = generation
    os.utime(file, ns=(generation, generation))


def _metadata(root: str, bucket: str, name: str) -> dict:
    file = os.path.join(root, bucket, name)
    info = os.stat(file)
    updated = datetime.datetime.fromtimestamp(info.st_mtime, datetime.timezone.utc).isoformat()
    return {"kind": "storage#object", "bucket": bucket, "name": name, "generation": str(info.st_mtime_ns),
            "metageneration": "1", "size": str(info.st_size), "updated": updated, "timeCreated": updated,
            "contentType": "application/octet-stream"}


class _Handler(BaseHTTPRequestHandler):
    root = ""
    lock = threading.Lock()
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: int, message: str):
        self._reply(code, json.dumps({"error": {"code": code, "message": message}}).encode())

    def _parse(self):
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        parts = url.path.split("/")
        return parts, query

    def _preconditions_fail(self, file: str, query: dict) -> bool:
        exists = os.path.isfile(file)
        want = query.get("ifGenerationMatch")
        if want is not None and (int(want) == 0 and exists or int(want) != 0 and
                                 (not exists or _generation(file) != int(want))):
            self._error(412, "precondition failed")
            return True
        return False

    def do_GET(self):
        parts, query = self._parse()
        # /storage/v1/b/<bucket>[/o[/<name>]]
        if parts[1:4] != ["storage", "v1", "b"] or len(parts) < 5:
            return self._error(404, "unknown endpoint")
        bucket = parts[4]
        if len(parts) == 5:  # the bucket's metadata (orbax asks whether it has a hierarchical namespace)
            if not os.path.isdir(os.path.join(self.root, bucket)):
                return self._error(404, f"no such bucket: {bucket}")
            return self._reply(200, json.dumps({"kind": "storage#bucket", "name": bucket, "id": bucket,
                                                "location": "US", "storageClass": "STANDARD"}).encode())
        if parts[5] != "o":
            return self._error(404, "unknown endpoint")
        if len(parts) == 6 or parts[6] == "":
            return self._list(bucket, query)
        name = urllib.parse.unquote("/".join(parts[6:]))
        file = os.path.join(self.root, bucket, name)
        with self.lock:
            if not os.path.isfile(file):
                return self._error(404, f"no such object: {bucket}/{name}")
            if self._preconditions_fail(file, query):
                return None
            generation = _generation(file)
            if query.get("ifGenerationNotMatch") and int(query["ifGenerationNotMatch"]) == generation:
                return self._reply(304, headers={"x-goog-generation": str(generation)})
            if query.get("alt") != "media":
                return self._reply(200, json.dumps(_metadata(self.root, bucket, name)).encode())
            with open(file, "rb") as f:
                data = f.read()
        headers = {"x-goog-generation": str(generation), "x-goog-metageneration": "1",
                   "x-goog-stored-content-length": str(len(data))}
        span = self.headers.get("Range")
        if span and span.startswith("bytes="):
            first, _, last = span[6:].partition("-")
            if first == "":  # suffix range: the last N bytes
                start, end = max(0, len(data) - int(last)), len(data) - 1
            else:
                start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            if start >= len(data) and len(data) > 0:
                return self._reply(416, headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._reply(206, data[start:end + 1], headers, "application/octet-stream")
        return self._reply(200, data, headers, "application/octet-stream")

    def _list(self, bucket: str, query: dict):
        prefix = query.get("prefix", "")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        base = os.path.join(self.root, bucket)
        items = []
        with self.lock:
            for folder, _, files in os.walk(base):
                for file in files:
                    name = os.path.relpath(os.path.join(folder, file), base)
                    if name.startswith(prefix) and name >= start and (end is None or name < end):
                        items.append(_metadata(self.root, bucket, name))
        items.sort(key=lambda item: item["name"])
        self._reply(200, json.dumps({"kind": "storage#objects", "items": items}).encode())

    def do_POST(self):
        parts, query = self._parse()
        # /upload/storage/v1/b/<bucket>/o?uploadType=media&name=<name>
        if parts[1:5] != ["upload", "storage", "v1", "b"] or query.get("uploadType") != "media":
            return self._error(400, f"unsupported upload {self.path}")
        bucket, name = parts[5], query["name"]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        file = os.path.join(self.root, bucket, name)
        with self.lock:
            if self._preconditions_fail(file, query):
                return None
            os.makedirs(os.path.dirname(file), exist_ok=True)
            with open(file + ".upload", "wb") as f:
                f.write(body)
            os.replace(file + ".upload", file)
            _new_generation(file)
            return self._reply(200, json.dumps(_metadata(self.root, bucket, name)).encode())

    def do_DELETE(self):
        parts, query = self._parse()
        bucket, name = parts[4], urllib.parse.unquote("/".join(parts[6:]))
        file = os.path.join(self.root, bucket, name)
        with self.lock:
            if not os.path.isfile(file):
                return self._error(404, f"no such object: {bucket}/{name}")
            if self._preconditions_fail(file, query):
                return None
            os.remove(file)
            return self._reply(204)


class FakeGCSFileSystem(DirFileSystem):
    """fsspec's "gcs" protocol over the folder FAKE_GCS_ROOT: names are "<bucket>/<object>" as gcsfs gives them;
    appending is refused, as GCS objects cannot be appended to."""

    protocol = ("gcs", "gs")

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(path=os.environ["FAKE_GCS_ROOT"], fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
        path = path if isinstance(path, str) else os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return path.rstrip("/")

    def open(self, path, mode="rb", *args, **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"cannot append to an object-storage file ({path}): objects are immutable")
        return super().open(path, mode, *args, **kwargs)


def install(root: str, url: str) -> None:
    """Points this process's gs:// at the fake: fsspec's "gcs" protocol and the tensorstore/google-cloud-cpp
    endpoints (read when they first open a GCS store)."""
    os.environ.update(FAKE_GCS_ROOT=root, FAKE_GCS_URL=url, TENSORSTORE_GCS_HTTP_URL=url,
                      CLOUD_STORAGE_EMULATOR_ENDPOINT=url, STORAGE_EMULATOR_HOST=url, GCE_METADATA_ROOT="127.0.0.1:9")
    os.makedirs(os.path.join(root, BUCKET), exist_ok=True)
    for protocol in FakeGCSFileSystem.protocol:
        fsspec.register_implementation(protocol, FakeGCSFileSystem, clobber=True)


def install_from_env() -> None:
    if os.environ.get("FAKE_GCS_ROOT") and os.environ.get("FAKE_GCS_URL"):
        install(os.environ["FAKE_GCS_ROOT"], os.environ["FAKE_GCS_URL"])


class FakeGCS:
    """The HTTP server (a thread of this process) over `root`; `url` is its endpoint."""

    def __init__(self, root: str):
        handler = type("Handler", (_Handler,), {"root": root})
        self.root = root
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def local(self, url: str) -> str:
        """The file that holds object `url` (gs://bucket/name)."""
        return os.path.join(self.root, url.removeprefix("gs://"))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
