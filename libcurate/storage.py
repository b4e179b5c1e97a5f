"""All storage in one place: a local directory or ``s3://bucket/prefix`` behind one interface.

A :class:`Store` is rooted at a URL; every other method takes paths *relative* to that root with ``/``
separators. Writes are atomic on both backends: a local write goes to a temporary file in the same
directory and is renamed into place; an S3 ``PutObject`` is atomic by nature (a reader sees the old
object or the new one, never a torn one).

S3 settings come from the standard AWS environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, profiles, workload
identity) or from explicit :class:`S3Options` (the recipe's ``storage:`` block), so MinIO, R2 and moto work.
A store registers its options under its root URL, so a bare ``s3://`` URL inside it (``store.uri(rel)``, as
handed to webdataset's opener) is read with the same endpoint and credentials (:func:`options_for_url`).

Faults: botocore retries 500s, 503 SlowDown and connection errors of a request, including a reply cut
while it reads a non-streaming body (list, head, put). What it leaves to the caller is a connection cut
partway through a *streamed* GET body: :class:`RetryingBody` re-issues the GET with a ``Range`` from the
offset already read, pinned to the first reply's ETag. Local writes honour the process umask
(``0666 & ~umask``), as ``open()`` would, instead of ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Iterator

log = logging.getLogger(__name__)


class StorageError(Exception):
    """A storage operation failed (missing object, bad URL, permission)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its path relative to the listed prefix, size in bytes, and modification time
    (Unix seconds: the file's mtime, or S3's ``LastModified``, which the server sets, so every writer's
    objects share one clock; S3 reports whole seconds)."""

    name: str
    size: int
    mtime: float


@dataclass(frozen=True)
class S3Options:
    """Connection settings for S3-compatible stores; ``None`` falls back to the AWS environment.

    Attributes:
        endpoint_url: e.g. ``http://127.0.0.1:9000`` for MinIO or moto; ``None`` for AWS.
        region: the bucket's region.
        access_key_id / secret_access_key: only for tests and local stores; production uses workload
            identity or a Secret mounted as the standard environment variables.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "S3Options":
        d = dict(d or {})
        unknown = set(d) - {"endpoint_url", "region", "access_key_id", "secret_access_key"}
        if unknown:
            raise ValueError(f"unknown storage option(s): {sorted(unknown)}")
        return cls(**d)


_CLIENTS: dict = {}


def s3_client(options: S3Options | None = None):
    """A boto3 S3 client, cached per process and options (clients are thread-safe, sessions are not)."""
    options = options or S3Options()
    cache_key = (os.getpid(), options, os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"))
    client = _CLIENTS.get(cache_key)
    if client is None:
        import boto3
        from botocore.config import Config

        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        session = boto3.session.Session(
            aws_access_key_id=options.access_key_id,
            aws_secret_access_key=options.secret_access_key,
            region_name=options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )
        # Adaptive retries absorb S3 throttling (503 SlowDown) without failing a whole shard.
        client = session.client(
            "s3",
            endpoint_url=endpoint,
            config=Config(retries={"max_attempts": 8, "mode": "adaptive"}, max_pool_connections=32),
        )
        _CLIENTS[cache_key] = client
    return client


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not url.startswith("s3://"):
        raise StorageError(f"not an s3 URL: {url!r}")
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if len(bucket) < 3:
        raise StorageError(f"bad bucket name in {url!r}")
    return bucket, key.strip("/")


def _check_rel(path: str) -> str:
    path = path.strip("/")
    if not path or any(p in ("..", "") for p in path.split("/")):
        raise StorageError(f"bad relative path {path!r}")
    return path


class Store:
    """Base class: a root URL plus relative-path operations. Use :func:`open_store` to get one."""

    url: str

    def uri(self, rel: str) -> str:
        """The absolute URL (local path or ``s3://``) of ``rel``."""
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def list(self, rel: str = "") -> list[str]:
        """Relative paths of all objects under ``rel`` (recursively), sorted."""
        raise NotImplementedError

    def list_info(self, rel: str = "") -> list[ObjectInfo]:
        """Like :meth:`list`, with each object's size and modification time (one paginated S3 listing)."""
        raise NotImplementedError

    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the immediate sub-prefixes ("directories") of ``rel``, sorted, without their contents."""
        raise NotImplementedError

    def open_read(self, rel: str) -> BinaryIO:
        """A streaming binary reader; raises ``FileNotFoundError`` if absent."""
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """Yield a binary writer; the object appears atomically when the block exits without error."""
        raise NotImplementedError
        yield  # pragma: no cover

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_write(rel) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def delete(self, rel: str) -> None:
        """Delete one object; absent objects are ignored."""
        raise NotImplementedError

    def clean_partial(self, rel: str) -> int:
        """Remove leftovers of writes that were killed mid-way (local temp files); returns how many."""
        return 0


class LocalStore(Store):
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = self.root

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, *_check_rel(rel).split("/"))

    def uri(self, rel: str) -> str:
        return self._p(rel)

    def exists(self, rel: str) -> bool:
        return os.path.isfile(self._p(rel))

    def list(self, rel: str = "") -> list[str]:
        base = self._p(rel) if rel.strip("/") else self.root
        out = []
        if not os.path.isdir(base):
            return out
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if ".tmp-" in name:  # an interrupted atomic write, not an object
                    continue
                out.append(os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/"))
        return sorted(out)

    def list_info(self, rel: str = "") -> list[ObjectInfo]:
        base = self._p(rel) if rel.strip("/") else self.root
        out = []
        for name in self.list(rel):
            with contextlib.suppress(FileNotFoundError):  # removed between the walk and the stat
                st = os.stat(os.path.join(base, *name.split("/")))
                out.append(ObjectInfo(name, st.st_size, st.st_mtime))
        return out

    def list_dirs(self, rel: str = "") -> list[str]:
        base = self._p(rel) if rel.strip("/") else self.root
        if not os.path.isdir(base):
            return []
        return sorted(e.name for e in os.scandir(base) if e.is_dir())

    def open_read(self, rel: str) -> BinaryIO:
        return open(self._p(rel), "rb")

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        path = self._p(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # The writer's pid in the name lets clean_partial tell a dead writer's leftovers from live writes.
        fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.tmp-{os.getpid()}-", dir=os.path.dirname(path))
        try:
            # mkstemp creates 0600; a run's outputs (the exported dataset above all) are read by trainers
            # running as other users, so give them the mode open() would: 0666 minus the umask.
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._p(rel))

    def clean_partial(self, rel: str) -> int:
        n = 0
        for dirpath, _dirs, files in os.walk(self._p(rel)):
            for name in files:
                if ".tmp-" in name and not _writer_alive(name, os.path.join(dirpath, name)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        n += 1
        return n


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it (``/proc/self/status``);
    elsewhere set and restored under a lock (``os.umask`` is the only portable reader)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _writer_alive(tmp_name: str, path: str | None = None) -> bool:
    """Whether the process that is writing ``<name>.tmp-<pid>-<random>`` (at ``path``) still runs here.

    A killed writer whose parent died too (a SIGKILLed runner's pool worker) stays a zombie until init
    reaps it, which answers ``kill(pid, 0)`` like a live process: a zombie is dead. So is a live process
    that started after the temporary file was last written (the pid was reused)."""
    try:
        pid = int(tmp_name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False  # this process is not writing while it cleans
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    state, started = _proc_state(pid)
    if state in ("Z", "X"):
        return False
    if started is not None and path is not None:
        with contextlib.suppress(OSError):
            if started > os.stat(path).st_mtime + 2.0:  # 2 s: btime has whole seconds
                return False
    return True


def _proc_state(pid: int) -> tuple[str | None, float | None]:
    """(state letter, start time as a Unix time) of a process from ``/proc`` (Linux); Nones elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        state, ticks = fields[0].decode(), int(fields[19])
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return state, btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None, None


# -- S3: fault handling botocore leaves to the caller -------------------------------------------------
# Consecutive failed attempts at reading one GET body before the error is raised.
BODY_ATTEMPTS = 8
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 2.0


def _transient_errors() -> tuple:
    """Exceptions of a body read that a new GET can fix (the connection broke, not the request)."""
    import http.client

    import urllib3.exceptions
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError

    return (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError,
            urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError)


def _backoff(failures: int) -> float:
    d = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (failures - 1))
    return d / 2 + random.random() * d / 2


class RetryingBody(io.RawIOBase):
    """A GET body that survives a connection cut partway through: it re-issues the GET with
    ``Range: bytes=<offset already read>-`` and ``If-Match: <the first reply's ETag>`` (an object replaced
    in between is an error, never a splice of two versions), up to ``BODY_ATTEMPTS`` consecutive failures
    with jittered exponential backoff. ``retries`` counts the re-issued GETs."""

    def __init__(self, client, bucket: str, key: str, first: dict):
        super().__init__()
        self._client, self._bucket, self._key = client, bucket, key
        self._etag = first.get("ETag")
        self._length = first.get("ContentLength")
        self._body = first["Body"]
        self._pos = 0
        self.retries = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if size == 0:
            return b""
        errors = _transient_errors()
        failures = 0
        while True:
            if self._length is not None and self._pos >= self._length:
                return b""
            try:
                data = self._body.read(size)
            except errors as e:
                failures += 1
                if failures >= BODY_ATTEMPTS:
                    raise
                log.info("S3 GET s3://%s/%s cut at byte %d (%s); resuming", self._bucket, self._key, self._pos,
                         type(e).__name__)
                self._resume(failures)
                continue
            self._pos += len(data)
            return data

    def readall(self) -> bytes:
        chunks = []
        while True:
            data = self.read(1 << 20)
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    def _resume(self, failures: int) -> None:
        from botocore.exceptions import ClientError

        with contextlib.suppress(Exception):
            self._body.close()
        time.sleep(_backoff(failures))
        kw = {"Bucket": self._bucket, "Key": self._key, "Range": f"bytes={self._pos}-"}
        if self._etag:
            kw["IfMatch"] = self._etag
        try:
            resp = self._client.get_object(**kw)  # botocore retries this request's own faults
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise StorageError(f"s3://{self._bucket}/{self._key} changed while it was read") from e
            raise
        self._body = resp["Body"]
        self.retries += 1

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


# Options of every S3 store opened with explicit ones, by root URL: a bare URL inside such a root
# (``store.uri(rel)`` handed to webdataset's s3:// opener, a store opened on a sub-prefix) is read with
# the run's endpoint and credentials, not the AWS environment's.
_ROOT_OPTIONS: dict[str, S3Options] = {}


def options_for_url(url: str) -> S3Options:
    """The options registered for the longest store root containing ``url`` (default: the environment's)."""
    url = url.rstrip("/")
    best, opts = -1, S3Options()
    for root, o in list(_ROOT_OPTIONS.items()):
        if (url == root or url.startswith(root + "/")) and len(root) > best:
            best, opts = len(root), o
    return opts


class S3Store(Store):
    # Writes larger than this spill from memory to a temporary file before upload.
    SPOOL_BYTES = 64 << 20

    def __init__(self, url: str, options: S3Options | None = None, register: bool = True):
        self.bucket, self.prefix = split_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        if options is None or options == S3Options():
            options = options_for_url(self.url)
        elif register:
            _ROOT_OPTIONS[self.url] = options
        self.options = options

    @property
    def client(self):
        return s3_client(self.options)

    def _k(self, rel: str) -> str:
        rel = _check_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def uri(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._k(rel)}"

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(rel))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, rel: str = "") -> list[str]:
        base = self._k(rel) + "/" if rel.strip("/") else (self.prefix + "/" if self.prefix else "")
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                out.append(obj["Key"][len(base):])
        return sorted(out)

    def list_info(self, rel: str = "") -> list[ObjectInfo]:
        base = self._k(rel) + "/" if rel.strip("/") else (self.prefix + "/" if self.prefix else "")
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(obj["Key"][len(base):], int(obj["Size"]), obj["LastModified"].timestamp()))
        return sorted(out, key=lambda o: o.name)

    def list_dirs(self, rel: str = "") -> list[str]:
        base = self._k(rel) + "/" if rel.strip("/") else (self.prefix + "/" if self.prefix else "")
        out = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/")
        for page in pages:
            out.extend(p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(out)

    def open_read(self, rel: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        key = self._k(rel)
        try:
            first = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(self.uri(rel)) from e
            raise
        return RetryingBody(self.client, self.bucket, key, first)  # type: ignore[return-value]

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as body:
            return body.read()

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        key = self._k(rel)
        with tempfile.SpooledTemporaryFile(max_size=self.SPOOL_BYTES) as f:
            yield f
            f.seek(0)
            self.client.upload_fileobj(f, self.bucket, key)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._k(rel), Body=data)

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(rel))


def open_store(url: str, options: S3Options | dict | None = None) -> Store:
    """A :class:`Store` for a local directory or an ``s3://bucket/prefix`` URL.

    ``options`` (the recipe's ``storage.options``) are remembered for the store's root: later stores and
    URLs inside it opened without options (:func:`open_url`, webdataset's ``s3://`` opener) use them too.
    """
    if isinstance(options, dict) or options is None:
        options = S3Options.from_dict(options)
    if url.startswith("s3://"):
        return S3Store(url, options)
    if "://" in url and not url.startswith("file://"):
        raise StorageError(f"unsupported storage URL {url!r} (use a local path or s3://bucket/prefix)")
    return LocalStore(url[len("file://"):] if url.startswith("file://") else url)


def open_url(url: str, options: S3Options | dict | None = None) -> BinaryIO:
    """A streaming reader of one object named by an absolute URL (local path or s3://). Without
    ``options``, an ``s3://`` URL inside a store opened with options is read with that store's."""
    if url.startswith("s3://"):
        bucket, key = split_s3_url(url)
        parent, _, name = key.rpartition("/")
        if isinstance(options, dict) or options is None:
            options = S3Options.from_dict(options)
        # One object's directory is not a store root: do not register it.
        return S3Store(f"s3://{bucket}/{parent}" if parent else f"s3://{bucket}", options, register=False).open_read(name)
    return open(url, "rb")


def read_url(url: str, options: S3Options | dict | None = None) -> bytes:
    """Read a whole object named by an absolute URL (local path or s3://)."""
    with open_url(url, options) as f:
        return f.read()
