"""All storage in one place: a local directory or ``s3://bucket/prefix`` behind one interface.

A :class:`Store` is rooted at a URL; every other method takes paths *relative* to that root with ``/``
separators. Writes are atomic on both backends: a local write goes to a temporary file in the same
directory and is renamed into place; an S3 ``PutObject`` is atomic by nature (a reader sees the old
object or the new one, never a torn one).

S3 settings come from the standard AWS environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, profiles, workload
identity) or from explicit :class:`S3Options` (the recipe's ``storage:`` block), so MinIO, R2 and moto work.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator


class StorageError(Exception):
    """A storage operation failed (missing object, bad URL, permission)."""


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

    def open_read(self, rel: str) -> BinaryIO:
        return open(self._p(rel), "rb")

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        path = self._p(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # The writer's pid in the name lets clean_partial tell a dead writer's leftovers from live writes.
        fd, tmp = tempfile.mkstemp(prefix=f"{os.path.basename(path)}.tmp-{os.getpid()}-", dir=os.path.dirname(path))
        try:
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
                if ".tmp-" in name and not _writer_alive(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        n += 1
        return n


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process that is writing ``<name>.tmp-<pid>-<random>`` still runs (on this machine)."""
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
        return True
    return True


class S3Store(Store):
    # Writes larger than this spill from memory to a temporary file before upload.
    SPOOL_BYTES = 64 << 20

    def __init__(self, url: str, options: S3Options | None = None):
        self.bucket, self.prefix = split_s3_url(url)
        self.options = options or S3Options()
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")

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

    def open_read(self, rel: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(rel))["Body"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(self.uri(rel)) from e
            raise

    def read_bytes(self, rel: str) -> bytes:
        body = self.open_read(rel)
        try:
            return body.read()
        finally:
            body.close()

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
    """A :class:`Store` for a local directory or an ``s3://bucket/prefix`` URL."""
    if isinstance(options, dict) or options is None:
        options = S3Options.from_dict(options)
    if url.startswith("s3://"):
        return S3Store(url, options)
    if "://" in url and not url.startswith("file://"):
        raise StorageError(f"unsupported storage URL {url!r} (use a local path or s3://bucket/prefix)")
    return LocalStore(url[len("file://"):] if url.startswith("file://") else url)


def open_url(url: str, options: S3Options | dict | None = None) -> BinaryIO:
    """A streaming reader of one object named by an absolute URL (local path or s3://)."""
    if url.startswith("s3://"):
        bucket, key = split_s3_url(url)
        parent, _, name = key.rpartition("/")
        return open_store(f"s3://{bucket}/{parent}" if parent else f"s3://{bucket}", options).open_read(name)
    return open(url, "rb")


def read_url(url: str, options: S3Options | dict | None = None) -> bytes:
    """Read a whole object named by an absolute URL (local path or s3://)."""
    with open_url(url, options) as f:
        return f.read()

