"""A bounded reader for the GGUF header: metadata and the tensor directory.

Every count, length and offset is checked against the bytes actually in the
file before it is used, so a hostile or truncated file fails with a
``ModelFileError`` naming the key or tensor, never with a huge allocation or a
stray ``struct.error``. (``gguf.GGUFReader`` trusts the header, and parsing the
default model's 49k-entry vocabulary through it takes seconds; this reader
takes tens of milliseconds.) The format is described in ggml's ``docs/gguf.md``.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.loading.errors import ModelFileError
from model.loading.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_LEN = 65535  # the spec's limit on key names
MAX_NESTING = 3  # arrays of arrays of arrays; real files use one level
DEFAULT_ALIGNMENT = 32
_FIXED_HEADER = 24  # magic, version, tensor count, metadata count
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset
_MIN_KV = 8 + 4 + 1  # empty key, value type, one-byte value

_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's data lies. ``shape`` is in numpy (row-major) order."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute position of the first byte in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]  # scalars, str, list[str], np.ndarray for numeric arrays
    tensors: dict[str, GGUFTensorInfo]
    file_size: int


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, message: str, key: str | None = None) -> ModelFileError:
        return ModelFileError(self.path, message, key)

    def need(self, n: int, what: str, key: str | None) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"{what} needs {n} bytes at offset {self.pos}, past the end of the file", key
            )

    def unpack(self, fmt: str, what: str, key: str | None = None) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what, key)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str, key: str | None = None, limit: int | None = None) -> str:
        n = self.unpack("<Q", f"{what} length", key)
        if limit is not None and n > limit:
            raise self.fail(f"{what} length {n} exceeds {limit}", key)
        self.need(n, what, key)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(
                f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})", key
            ) from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], "value", key)
        if vtype == GGUFValueType.STRING:
            return self.string("string value", key)
        if vtype == GGUFValueType.ARRAY:
            return self.array(key, depth)
        raise self.fail(f"unknown metadata value type {vtype}", key)

    def array(self, key: str, depth: int) -> Any:
        if depth >= MAX_NESTING:
            raise self.fail(f"arrays nested deeper than {MAX_NESTING} levels", key)
        itype = self.unpack("<I", "array item type", key)
        count = self.unpack("<Q", "array length", key)
        if itype in _SCALARS:
            item = struct.calcsize(_SCALARS[itype])
            self.need(count * item, f"array of {count} items", key)
            dtype = np.dtype(_SCALARS[itype])
            # copy: the result must outlive the memory map
            out = np.frombuffer(self.buf, dtype, count, self.pos).copy()
            self.pos += count * item
            return out
        min_item = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}.get(itype)
        if min_item is None:
            raise self.fail(f"unknown array item type {itype}", key)
        self.need(count * min_item, f"array of {count} items", key)
        if itype == GGUFValueType.STRING:
            return self.strings(count, key)
        return [self.array(key, depth + 1) for _ in range(count)]

    def strings(self, count: int, key: str) -> list[str]:
        """An array of strings (a tokenizer's vocabulary: tens of thousands), in a tight loop."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack_len = struct.Struct("<Q").unpack_from
        out: list[bytes] = []
        for _ in range(count):
            n = unpack_len(buf, pos)[0] if pos + 8 <= size else size
            if pos + 8 + n > size:
                self.pos = pos
                raise self.fail(
                    f"string {len(out)} of the array runs past the end of the file", key
                )
            out.append(buf[pos + 8 : pos + 8 + n])
            pos += 8 + n
        self.pos = pos
        try:
            return [raw.decode("utf-8") for raw in out]
        except UnicodeDecodeError as e:
            raise self.fail(f"a string in the array is not valid UTF-8 ({e.reason})", key) from None


# The headers kept inside gguf_headers_reused(), per thread (by path, size, mtime and
# inode): a block in one thread neither sees another thread's nor ends it.
_Headers = dict[tuple[str, int, int, int], GGUFHeader]
_local = threading.local()


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse and validate a GGUF file's header; tensor data is not read. Inside
    ``gguf_headers_reused()`` a file's header is parsed once (callers must not
    modify it)."""
    path = Path(path)
    reused: _Headers | None = getattr(_local, "reused", None)
    if reused is None:
        return _read_gguf_header(path)
    try:
        st = path.stat()
    except OSError as e:
        raise ModelFileError(path, f"cannot read the file ({e.strerror or e})") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in reused:
        reused[key] = _read_gguf_header(path)
    return reused[key]


@contextlib.contextmanager
def gguf_headers_reused() -> Iterator[None]:
    """Loading a model reads its file's header for the weights and again for the
    tokenizer; within this block the second read reuses the first (a vocabulary of
    49,152 tokens takes ~0.1 s to parse). The headers are dropped on leaving it. The
    block holds for the calling thread only."""
    outer = getattr(_local, "reused", None)
    _local.reused = {} if outer is None else outer
    try:
        yield
    finally:
        _local.reused = outer


def _read_gguf_header(path: Path) -> GGUFHeader:
    try:
        with path.open("rb") as f:
            if path.stat().st_size < _FIXED_HEADER:
                raise ModelFileError(path, "too short for a GGUF header")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelFileError(path, f"cannot read the file ({e.strerror or e})") from None
    with buf:
        return _parse(_Cursor(buf, path))


def _parse(cur: _Cursor) -> GGUFHeader:
    cur.need(_FIXED_HEADER, "the GGUF header", None)
    if cur.buf[:4] != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (magic {cur.buf[:4]!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.unpack("<I", "version")
    if version & 0xFFFF == 0 and version != 0:
        raise cur.fail("big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    room = cur.size - _FIXED_HEADER
    if n_tensors * _MIN_TENSOR_INFO + n_kv * _MIN_KV > room:
        raise cur.fail(
            f"header claims {n_tensors} tensors and {n_kv} metadata entries, "
            f"more than a {cur.size}-byte file can hold"
        )
    metadata = _read_metadata(cur, n_kv)
    alignment = _alignment(cur, metadata)
    infos = [_read_tensor_info(cur) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, qtype, rel_offset in infos:
        if name in tensors:
            raise cur.fail("duplicate tensor", name)
        tensors[name] = _place_tensor(cur, name, shape, qtype, rel_offset, data_start, alignment)
    return GGUFHeader(cur.path, version, metadata, tensors, cur.size)


def _read_metadata(cur: _Cursor, count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for _ in range(count):
        key = cur.string("metadata key", limit=MAX_KEY_LEN)
        vtype = cur.unpack("<I", "value type", key)
        if key in metadata:
            raise cur.fail("duplicate metadata key", key)
        metadata[key] = cur.value(vtype, key)
    return metadata


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"alignment must be a power of two, got {alignment!r}", "general.alignment")
    return alignment


def _read_tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string("tensor name", limit=MAX_KEY_LEN)
    n_dims = cur.unpack("<I", "dimension count", name)
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor has {n_dims} dimensions (1 to {MAX_DIMS} allowed)", name)
    dims = [cur.unpack("<Q", "dimension", name) for _ in range(n_dims)]
    if min(dims) <= 0:
        raise cur.fail(f"tensor has an empty dimension {dims}", name)
    raw_type = cur.unpack("<I", "tensor type", name)
    offset = cur.unpack("<Q", "tensor data offset", name)
    return name, tuple(reversed(dims)), raw_type, offset  # ggml lists the innermost dim first


def _place_tensor(
    cur: _Cursor,
    name: str,
    shape: tuple[int, ...],
    raw_type: int,
    rel_offset: int,
    data_start: int,
    alignment: int,
) -> GGUFTensorInfo:
    try:
        qtype = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(f"unknown tensor type {raw_type}", name) from None
    if shape[-1] % block_size:
        raise cur.fail(
            f"row length {shape[-1]} is not a multiple of the {qtype.name} block ({block_size})",
            name,
        )
    if rel_offset % alignment:
        raise cur.fail(f"data offset {rel_offset} is not aligned to {alignment} bytes", name)
    nbytes = int(np.prod(shape, dtype=object)) // block_size * type_size
    start = data_start + rel_offset
    if start + nbytes > cur.size:
        raise cur.fail(
            f"data ({nbytes} bytes at offset {start}) runs past the end of the {cur.size}-byte file",
            name,
        )
    return GGUFTensorInfo(name, qtype, shape, start, nbytes)
