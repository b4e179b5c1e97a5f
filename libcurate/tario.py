"""Tar members in and out without :mod:`tarfile`: the per-member cost of every shard a stage reads or writes.

``tarfile`` (and webdataset, which reads and writes through it) spends ~0.1-0.2 ms of Python per member on
building ``TarInfo`` objects, and written with a float mtime every member gets a 1 KiB pax header of its
own. A shard member is always a plain file with a short ASCII name, so both directions reduce to slicing
512-byte headers.

Writing (:class:`TarStreamWriter`) emits the ustar header ``tarfile`` itself would write for the member in
``PAX_FORMAT`` with an integer mtime, byte for byte; a name that does not fit ustar (over 100 bytes, not
ASCII) or a size over 8 GiB gets ``tarfile``'s own pax header for that member. The end of the archive is
two zero blocks padded to a 10 KiB record, as ``tarfile`` closes it. So the output is the archive
``tarfile.open(mode="w|", format=PAX_FORMAT)`` gives for the same members.

Reading (:func:`iter_files`) is sequential (a streamed S3 body never seeks) and yields the regular
members' ``(name, data)``. It follows ``tarfile``'s reading of ustar, GNU and pax archives: pax ``x``
records ``path`` and ``size``, GNU ``L`` long names, the ustar ``prefix`` field, a V7 regular member whose
name ends in ``/`` being a directory, and which member types carry data blocks. Global ``g`` headers and
GNU ``K`` long link names are read and ignored. gzip, bzip2 and xz archives are decompressed on the fly
(``tarfile``'s ``r|*`` did the same). It is stricter than ``tarfile`` in one way: every header's checksum
is verified and an archive must end with its zero block; ``tarfile`` silently ends a stream at a corrupt or
truncated header, which would drop the rest of a shard without a word.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from typing import BinaryIO, Iterator

BLOCK = 512
RECORD = 20 * BLOCK          # tarfile pads a closed archive to whole records of this size
ZERO_BLOCK = bytes(BLOCK)
MAX_USTAR_SIZE = 8 ** 11     # an 11-digit octal size field; larger sizes go into a pax header
MAX_USTAR_NAME = 100

REGULAR = (b"0", b"\0", b"7")                              # tarfile's REGULAR_TYPES, sparse aside
NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")             # links, devices, dirs, fifos: no data blocks
GNU_LONG = (b"L", b"K")
PAX = (b"x", b"X")                                          # X: Solaris' name for an extended header
GLOBAL = b"g"
SPARSE = b"S"


class TarFormatError(ValueError):
    """Not a tar archive, or a corrupt or truncated one."""


# -- writing -----------------------------------------------------------------------------------------
def _octal(n: int, digits: int) -> bytes:
    return b"%0*o\0" % (digits - 1, n)


def _padded(n: bytes | str, length: int) -> bytes:
    b = n.encode("ascii") if isinstance(n, str) else n
    return b + bytes(length - len(b))


class TarStreamWriter:
    """Append regular members to a binary file object, sequentially; :meth:`close` writes the end.

    Every member gets the same mode, owner and mtime (0), so the same members give the same bytes.
    ``offset`` is the number of bytes written so far.
    """

    def __init__(self, f: BinaryIO, uname: str, gname: str, mode: int = 0o644, mtime: int = 0):
        self.f = f
        self.uname, self.gname, self.mode, self.mtime = uname, gname, mode, int(mtime)
        self.offset = 0
        # The header minus name, size and checksum: bytes 100:124 (mode, uid, gid), 136:148 (mtime), 156:512.
        self._ids = _octal(mode & 0o7777, 8) + _octal(0, 8) + _octal(0, 8)
        self._mtime = _octal(self.mtime, 12)
        self._rest = (b"0" + bytes(100) + tarfile.POSIX_MAGIC + _padded(uname, 32) + _padded(gname, 32)
                      + bytes(8 + 8 + 155 + 12))
        assert len(self._ids) + 12 + len(self._mtime) + 8 + len(self._rest) + MAX_USTAR_NAME == BLOCK
        self._const_sum = sum(self._ids) + sum(self._mtime) + sum(self._rest) + 8 * ord(" ")

    def header(self, name: str, size: int) -> bytes:
        """The header block(s) of a regular member ``name`` of ``size`` bytes."""
        nb = name.encode("utf-8", "surrogateescape")
        if len(nb) > MAX_USTAR_NAME or not name.isascii() or not 0 <= size < MAX_USTAR_SIZE:
            return self._tarfile_header(name, size)
        field = _padded(nb, MAX_USTAR_NAME)
        size_f = _octal(size, 12)
        chk = self._const_sum + sum(nb) + sum(size_f)
        return b"".join((field, self._ids, size_f, self._mtime, b"%06o\0 " % chk, self._rest))

    def _tarfile_header(self, name: str, size: int) -> bytes:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, self.mtime, self.mode, self.uname, self.gname
        return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def add(self, name: str, data: bytes) -> None:
        head = self.header(name, len(data))
        pad = -len(data) % BLOCK
        self.f.write(head)
        self.f.write(data)
        if pad:
            self.f.write(ZERO_BLOCK[:pad])
        self.offset += len(head) + len(data) + pad

    def close(self) -> None:
        """Two zero blocks, then zeros up to a whole :data:`RECORD` (what ``tarfile`` writes on close)."""
        end = 2 * BLOCK
        end += -(self.offset + end) % RECORD
        self.f.write(bytes(end))
        self.offset += end


# -- reading -----------------------------------------------------------------------------------------
def _read(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at the end of the stream (a stream's read may return less)."""
    b = f.read(n)
    if len(b) == n or not b:
        return b
    parts, got = [b], len(b)
    while got < n:
        c = f.read(n - got)
        if not c:
            break
        parts.append(c)
        got += len(c)
    return b"".join(parts)


def _skip(f: BinaryIO, n: int, what: str) -> None:
    while n > 0:
        c = f.read(min(n, 1 << 20))
        if not c:
            raise TarFormatError(f"truncated tar: {what} ends early")
        n -= len(c)


def number(field: bytes) -> int:
    """A numeric header field: octal digits (NUL/space padded) or GNU base-256."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        raise TarFormatError("negative number in tar header")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise TarFormatError(f"not a tar header (field {field[:12]!r})") from None


def check_header(head: bytes) -> None:
    """Raise :class:`TarFormatError` unless ``head``'s checksum (unsigned, or signed as old tars) fits."""
    want = number(head[148:156])
    unsigned = sum(head) - sum(head[148:156]) + 8 * ord(" ")
    if want == unsigned:
        return
    high = sum(1 for b in head[:148] if b > 127) + sum(1 for b in head[156:] if b > 127)
    if want != unsigned - 256 * high:
        raise TarFormatError("bad tar header checksum")


def _is_header(head: bytes) -> bool:
    try:
        check_header(head)
    except TarFormatError:
        return False
    return len(head) == BLOCK


def _text(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def pax_records(buf: bytes) -> dict[str, str]:
    """The ``length keyword=value\\n`` records of a pax extended header."""
    out, pos, n = {}, 0, len(buf)
    while pos < n and buf[pos] != 0:
        sp = buf.find(b" ", pos, pos + 24)
        try:
            length = int(buf[pos:sp]) if sp > pos else 0
        except ValueError:
            length = 0
        end = pos + length
        if length <= 0 or end > n or buf[end - 1] != 0x0A:
            raise TarFormatError("invalid pax header record")
        kw, eq, val = buf[sp + 1:end - 1].partition(b"=")
        if not eq:
            raise TarFormatError("invalid pax header record")
        out[kw.decode("utf-8", "surrogateescape")] = val.decode("utf-8", "surrogateescape")
        pos = end
    return out


class _Prefixed(io.RawIOBase):
    """``head`` then the rest of ``f``: the first block, read to sniff compression, put back."""

    def __init__(self, head: bytes, f: BinaryIO):
        super().__init__()
        self._head, self._f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)


_COMPRESSED = ((b"\x1f\x8b\x08", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
               (b"BZh91", lambda f: bz2.BZ2File(f, mode="rb")),
               (b"\x5d\x00\x00\x80", lambda f: lzma.LZMAFile(f, mode="rb")),
               (b"\xfd7zXZ", lambda f: lzma.LZMAFile(f, mode="rb")))


def iter_files(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular members of the tar stream ``f``, in order; reads ``f`` sequentially.

    Non-regular members (directories, links, devices) are passed over, as are ``g`` and ``K`` headers.
    Raises :class:`TarFormatError` for an empty or non-tar stream, a bad header checksum, a truncated
    header or member, a sparse member, or a stream that ends before the end-of-archive block.
    """
    head = _read(f, BLOCK)
    if not head:
        raise TarFormatError("empty file, not a tar")
    for magic, opener in _COMPRESSED:
        # a tar whose first member is named "BZh91..." is a tar: only a block that is no header is sniffed
        if head.startswith(magic) and not _is_header(head):
            f = io.BufferedReader(opener(_Prefixed(head, f)))
            head = _read(f, BLOCK)
            break
    offset = 0
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        if len(head) < BLOCK:
            raise TarFormatError(f"truncated tar: no end-of-archive block (stream ends at byte {offset + len(head)})"
                                 if not head else f"truncated tar header at byte {offset}")
        if head == ZERO_BLOCK:
            return
        try:
            check_header(head)
        except TarFormatError as e:
            raise TarFormatError(f"{e} at byte {offset}" if offset else f"not a tar archive ({e})") from None
        kind = head[156:157]
        size = number(head[124:136])
        offset += BLOCK
        if kind in PAX or kind == GLOBAL or kind in GNU_LONG:
            data = _read(f, size + -size % BLOCK)
            if len(data) < size + -size % BLOCK:
                raise TarFormatError(f"truncated tar: extended header at byte {offset - BLOCK} ends early")
            offset += len(data)
            if kind in PAX:
                pax = pax_records(data[:size])
            elif kind == b"L":
                long_name = _text(data[:size])
            head = _read(f, BLOCK)
            continue
        name = _text(head[:100])
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"                                   # V7: a regular member named "x/" is a directory
        prefix = _text(head[345:500])
        if prefix:
            name = f"{prefix}/{name}"
        if long_name is not None:
            name, long_name = long_name, None
        if pax:
            if "path" in pax:
                name = pax["path"].rstrip("/")
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    size = 0                               # tarfile's reading of a bad pax number
            pax = {}
        if kind == SPARSE:
            raise TarFormatError(f"sparse tar member {name!r} is not supported")
        if kind in NO_DATA:
            head = _read(f, BLOCK)
            continue
        pad = -size % BLOCK
        if kind in REGULAR:
            data = _read(f, size)
            if len(data) < size:
                raise TarFormatError(f"truncated tar: member {name!r} ends early")
            yield name, data
        else:                                              # an unknown type: its data is skipped, as tarfile does
            _skip(f, size, f"member {name!r}")
        offset += size + pad
        head = _read(f, pad + BLOCK)[pad:]   # the padding and the next header in one read
