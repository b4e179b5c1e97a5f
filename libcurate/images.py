"""Image sources for ingest (a directory, an ``s3://`` prefix, or a ``.tar`` archive) and image checks.

Every failure is an :class:`ImageProblem` with a short machine reason so ingest can quarantine the sample
with that reason and go on: ``missing_image``, ``empty_image``, ``corrupt_image`` (undecodable, or a JPEG
whose entropy-coded data is damaged: see :func:`jpeg_damage`), ``decompression_bomb``, ``image_too_small``,
``unsafe_image_path`` (``..``/absolute reference, or one that resolves outside a local images root through
a symbolic link), ``bad_image_ref`` (a name the file system refuses, e.g. too long), ``unreadable_image``
(permission denied), ``unsafe_member_name`` / ``ambiguous_tar_member`` (a tar member name used twice) /
``truncated_tar`` for archives.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import posixpath
import re
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

    def sizes(self, refs) -> dict[str, int]:
        """Byte size of each reference that names a readable image (others are left out), without
        reading image bytes: used to lay shards out by bytes before ingest reads any image."""
        raise NotImplementedError


def _ref_or_none(ref: str) -> str | None:
    try:
        return safe_ref(ref)
    except ImageProblem:
        return None


class LocalImages(ImageSource):
    """Images under a local directory. A reference must resolve (symbolic links followed) to a file
    inside the root: a link that leads out of it is ``unsafe_image_path``, so a dataset cannot make
    ingest copy arbitrary files of the machine into the shards."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.real_root = os.path.realpath(self.root)

    def _path(self, ref: str) -> tuple[str, str]:
        rel = safe_ref(ref)
        path = os.path.join(self.root, *rel.split("/"))
        try:
            real = os.path.realpath(path, strict=False)
        except (OSError, ValueError) as e:
            raise ImageProblem("bad_image_ref", f"{rel}: {e}") from None
        if os.path.commonpath([self.real_root, real]) != self.real_root:
            raise ImageProblem("unsafe_image_path", f"{rel} resolves outside the images root {self.root} "
                               "(a symbolic link); point 'images' at the real folder instead")
        return rel, real

    def read(self, ref: str) -> bytes:
        rel, real = self._path(ref)
        try:
            with open(real, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ImageProblem("missing_image", f"{rel} not found under {self.root}") from None
        except PermissionError as e:
            raise ImageProblem("unreadable_image", f"{rel}: {e.strerror}") from None
        except OSError as e:
            if e.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL):
                raise ImageProblem("bad_image_ref", f"{rel}: {e.strerror}") from None
            raise

    def sizes(self, refs) -> dict[str, int]:
        out = {}
        for ref in refs:
            try:
                _, real = self._path(ref)
                st = os.stat(real)
            except (ImageProblem, OSError, ValueError):
                continue
            out[ref] = st.st_size
        return out


class StoreImages(ImageSource):
    """Images under an object-store prefix (``s3://``)."""

    def __init__(self, store: Store):
        self.store = store

    def read(self, ref: str) -> bytes:
        rel = safe_ref(ref)
        try:
            return self.store.read_bytes(rel)
        except (FileNotFoundError, IsADirectoryError):
            raise ImageProblem("missing_image", f"{rel} not found under {self.store.url}") from None

    def sizes(self, refs) -> dict[str, int]:
        """One listing of the prefix (1,000 objects a request) instead of a HEAD per image."""
        want: dict[str, list[str]] = {}
        for ref in refs:
            rel = _ref_or_none(ref)
            if rel is not None:
                want.setdefault(rel, []).append(ref)
        if not want:
            return {}
        client, bucket, prefix = self.store.client, self.store.bucket, self.store.prefix
        base = f"{prefix}/" if prefix else ""
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
            for obj in page.get("Contents", []):
                for ref in want.get(obj["Key"][len(base):], ()):
                    out[ref] = obj["Size"]
        return out


class TarImages(ImageSource):
    """Images inside a tar archive; members are indexed once (names -> where their bytes are), read by name.

    An uncompressed local ``.tar`` is indexed by offset and read with a seek per image (memory does not
    grow with the archive; every process opens its own handle, so forked workers never share a file
    position). A gzip archive or one on S3 is streamed once and its members kept in memory.
    Members with absolute or ``..`` names are never addressable. A name that appears twice (after
    normalisation: ``a.jpg`` and ``./a.jpg`` are one name) is ambiguous: tar would extract the last, other
    tools the first, so a reference to it is ``ambiguous_tar_member``, never a silent pick. A truncated
    archive keeps what could be read; references past the cut get ``truncated_tar`` rather than
    ``missing_image``. Links and other non-regular members are not addressable (``missing_image``).
    """

    def __init__(self, data_or_path):
        self.path = None if isinstance(data_or_path, bytes) else data_or_path
        self.members: dict[str, bytes | tuple[int, int]] = {}  # bytes, or (offset, size) in self.path
        self.unsafe: dict[str, str] = {}
        self.duplicates: dict[str, int] = {}  # name -> how many members carry it
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
                    if norm in self.members or norm in self.duplicates:
                        self.duplicates[norm] = self.duplicates.get(norm, 1) + 1
                        self.members[norm] = b""  # neither copy is served
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
        if rel in self.duplicates:
            raise ImageProblem("ambiguous_tar_member", f"{self.duplicates[rel]} archive members are named {rel!r}: "
                               "which one is meant is ambiguous")
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


    def sizes(self, refs) -> dict[str, int]:
        out = {}
        for ref in refs:
            rel = _ref_or_none(ref)
            m = self.members.get(rel) if rel is not None and rel not in self.duplicates else None
            if m is not None:
                out[ref] = len(m) if isinstance(m, bytes) else m[1]
        return out


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
    store = open_store(url, storage_options)
    if url.startswith("s3://"):
        return StoreImages(store)
    return LocalImages(store.url)  # a LocalStore: its url is the absolute root


@dataclass
class ImageLimits:
    """Attributes: max_pixels: refuse larger images (decompression bombs); min_side: refuse tinier ones."""

    max_pixels: int = 80_000_000
    min_side: int = 1


def inspect_image(data: bytes, name: str, limits: ImageLimits) -> ImageRef:
    """Decode fully to validate; return an :class:`ImageRef`. JPEG/PNG/WebP bytes are kept as they are;
    other decodable formats (GIF, BMP, TIFF) are re-encoded losslessly to PNG.

    A JPEG is validated by libjpeg-turbo's strict decode (:func:`jpeg_check`), which also finds a garbled
    scan that PIL decodes without complaint; PIL decodes only the JPEGs that check cannot take."""
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
            checked, damage = jpeg_check(data) if fmt in ("JPEG", "MPO") else (False, None)
            if damage:
                raise ImageProblem("corrupt_image", f"{name}: {damage}")
            if not checked:
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


# libjpeg's warnings that mean the entropy-coded data (the pixels) is damaged. Other warnings (a bad ICC
# marker, an unknown JFIF revision, odd SOS parameters of some encoders) leave the pixels intact.
_JPEG_DAMAGE = re.compile(r"Corrupt JPEG data(?!: bad ICC marker)|Premature end of JPEG file|"
                          r"Unsupported marker type|Bogus marker length|Inconsistent progression sequence|"
                          r"Huffman|Invalid JPEG file structure", re.I)


def jpeg_damage(data: bytes) -> str | None:
    """What is wrong with a JPEG's entropy-coded data, or ``None`` (see :func:`jpeg_check`)."""
    return jpeg_check(data)[1]


def jpeg_check(data: bytes) -> tuple[bool, str | None]:
    """``(checked, damage)``: whether libjpeg-turbo decoded the JPEG strictly, and what damage it found.

    PIL decodes a JPEG whose scan is garbled without complaint (Pillow's decoder silences libjpeg's
    warnings: the pixels are wrong from the damage on). libjpeg-turbo reports it as a warning ("Corrupt
    JPEG data: 39 extraneous bytes before marker 0xd9", "premature end of data segment", "bad Huffman
    code"); ``simplejpeg.decode_jpeg(strict=True)`` turns warnings into errors. The check decodes at 1/8
    scale in grey: every Huffman code is still read (the damage is found), most of the IDCT is skipped.
    An error that does not mean damage (a JPEG TurboJPEG cannot convert, e.g. CMYK with unusual
    subsampling; a harmless warning such as odd SOS parameters of some encoders) is ``(False, None)``:
    not checked, PIL decides.
    """
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=8, strict=True)
        return True, None
    except ValueError as e:
        msg = str(e)
    if not _JPEG_DAMAGE.search(msg):
        try:  # CMYK/YCCK JPEGs do not convert to grey
            simplejpeg.decode_jpeg(data, colorspace="CMYK", min_factor=8, strict=True)
            return True, None
        except ValueError as e:
            msg = str(e)
    return (True, msg) if _JPEG_DAMAGE.search(msg) else (False, None)
