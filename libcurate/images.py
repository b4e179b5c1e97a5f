"""Image sources for ingest (a directory, an ``s3://`` prefix, or a ``.tar`` archive) and image checks.

Every failure is an :class:`ImageProblem` with a short machine reason (``missing_image``, ``empty_image``,
``corrupt_image``, ``decompression_bomb``, ``unsafe_image_path``, ``unsupported_format``, ``truncated_tar``)
so ingest can quarantine the sample with that reason and go on.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
import warnings
from dataclasses import dataclass

from PIL import Image

from .formats.base import FormatError, norm_image_ref
from .records import ImageRef
from .storage import Store, open_store

# PIL's own bomb guard only warns below 2x its limit; we check the header ourselves and quarantine.
Image.MAX_IMAGE_PIXELS = None
NATIVE = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "MPO": "jpeg"}


class ImageProblem(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def safe_ref(ref: str) -> str:
    """Normalise an image reference; absolute paths, URLs and ``..`` escapes are refused."""
    try:
        return norm_image_ref(ref)
    except FormatError as e:
        raise ImageProblem("unsafe_image_path", e.detail) from None


class ImageSource:
    """Reads image bytes by reference relative to a root. Use :func:`open_images`."""

    def read(self, ref: str) -> bytes:
        raise NotImplementedError


class StoreImages(ImageSource):
    def __init__(self, store: Store):
        self.store = store

    def read(self, ref: str) -> bytes:
        rel = safe_ref(ref)
        try:
            return self.store.read_bytes(rel)
        except (FileNotFoundError, IsADirectoryError):
            raise ImageProblem("missing_image", f"{rel} not found under {self.store.url}") from None


class TarImages(ImageSource):
    """Images inside a tar archive; members are indexed once (names -> where their bytes are), read by name.

    An uncompressed local ``.tar`` is indexed by offset and read with a seek per image (memory does not
    grow with the archive; every process opens its own handle, so forked workers never share a file
    position). A gzip archive or one on S3 is streamed once and its members kept in memory.
    Members with absolute or ``..`` names are never addressable. A truncated archive keeps what could be
    read; references past the cut get ``truncated_tar`` rather than ``missing_image``.
    """

    def __init__(self, data_or_path):
        self.path = None if isinstance(data_or_path, bytes) else data_or_path
        self.members: dict[str, bytes | tuple[int, int]] = {}  # bytes, or (offset, size) in self.path
        self.unsafe: dict[str, str] = {}
        self.truncated = ""
        seekable = self.path is not None and self.path.endswith(".tar")
        fileobj = io.BytesIO(data_or_path) if self.path is None else open(self.path, "rb")
        self._fh = None
        self._fh_pid = None
        try:
            # "r:" reads headers and seeks over data; "r|*" streams (gzip, bytes) and must read data now.
            with tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|*") as tf:
                for ti in tf:
                    if not ti.isreg():
                        continue
                    try:
                        norm = safe_ref(ti.name)
                    except ImageProblem as e:
                        self.unsafe[_extracted_name(ti.name)] = e.detail
                        continue
                    if seekable:
                        self.members[norm] = (ti.offset_data, ti.size)
                    else:
                        f = tf.extractfile(ti)
                        self.members[norm] = f.read() if f else b""
        except (tarfile.TarError, EOFError, OSError) as e:
            self.truncated = f"{type(e).__name__}: {e}"
        finally:
            fileobj.close()

    def _read_at(self, offset: int, size: int) -> bytes:
        if self._fh is None or self._fh_pid != os.getpid():
            self._fh, self._fh_pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(offset)
        return self._fh.read(size)

    def read(self, ref: str) -> bytes:
        rel = safe_ref(ref)
        if rel in self.members:
            m = self.members[rel]
            if isinstance(m, bytes):
                return m
            data = self._read_at(*m)
            if len(data) != m[1]:
                raise ImageProblem("truncated_tar", f"{rel}: the archive ends inside this member "
                                   f"({len(data)} of {m[1]} bytes)")
            return data
        if rel in self.unsafe:
            raise ImageProblem("unsafe_member_name", f"archive member for {rel!r} has an unsafe name")
        if self.truncated:
            raise ImageProblem("truncated_tar", f"{rel} not found before the archive ended: {self.truncated}")
        raise ImageProblem("missing_image", f"{rel} not in archive")


def _extracted_name(name: str) -> str:
    """The name GNU tar would extract an unsafe member as (leading "/" and "../" stripped), so a record
    naming that file learns why it is refused."""
    stripped = posixpath.normpath(name.replace("\\", "/").lstrip("/"))
    while stripped.startswith("../"):
        stripped = stripped[3:]
    return stripped


def open_images(url: str, storage_options: dict | None = None) -> ImageSource:
    if url.endswith((".tar", ".tar.gz", ".tgz")):
        if url.startswith("s3://"):
            from .storage import read_url

            return TarImages(read_url(url, storage_options))
        return TarImages(url)
    return StoreImages(open_store(url, storage_options))


@dataclass
class ImageLimits:
    """Attributes: max_pixels: refuse larger images (decompression bombs); min_side: refuse tinier ones."""

    max_pixels: int = 80_000_000
    min_side: int = 1


def inspect_image(data: bytes, name: str, limits: ImageLimits) -> ImageRef:
    """Decode fully to validate; return an :class:`ImageRef`. JPEG/PNG/WebP bytes are kept as they are;
    other decodable formats (GIF, BMP, TIFF) are re-encoded losslessly to PNG."""
    if not data:
        raise ImageProblem("empty_image", f"{name}: zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > limits.max_pixels:
                raise ImageProblem("decompression_bomb", f"{name}: {w}x{h} = {w * h} pixels > {limits.max_pixels}")
            if min(w, h) < limits.min_side:
                raise ImageProblem("image_too_small", f"{name}: {w}x{h}")
            fmt = im.format
            im.load()
    except ImageProblem:
        raise
    except Image.DecompressionBombError as e:
        raise ImageProblem("decompression_bomb", f"{name}: {e}") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError) for corrupt data
        raise ImageProblem("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None
    if fmt in NATIVE:
        kind = NATIVE[fmt]
    else:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data, kind = buf.getvalue(), "png"
    return ImageRef(kind, hashlib.sha256(data).hexdigest(), w, h, name, data)
