"""Read a TensorFlow checkpoint (OpenAI's GPT-2 files) without TensorFlow.

A TensorFlow checkpoint `model.ckpt` is two files. `model.ckpt.data-00000-of-00001`
holds the raw bytes of every tensor, one after another. `model.ckpt.index` is a sorted
key -> value table in LevelDB's table format, mapping each tensor name to a small
protocol-buffer record (TensorFlow's `BundleEntryProto`): dtype, shape, and where the
tensor's bytes lie in the data file, with their CRC-32C checksum. Reading it takes
three steps: the table's blocks, the protocol-buffer records, the tensors.

Public descriptions of the formats:
- the table: https://github.com/google/leveldb/blob/main/doc/table_format.md
- the records: tensorflow/core/protobuf/tensor_bundle.proto in
  https://github.com/tensorflow/tensorflow
- protocol-buffer wire encoding: https://protobuf.dev/programming-guides/encoding/

`gpt_download.py` uses this reader by default, so the chapter runs without installing
TensorFlow; `download_and_load_gpt2(..., reader="tensorflow")` uses TensorFlow instead.

Shared file. The canonical copy is ch05/01_main-chapter-code/tf_checkpoint_reader.py;
`make sync` (scripts/sync_shared_code.py) overwrites the copies in the other ch05
folders with it, so edit the canonical file, never a copy.
"""

import struct
from pathlib import Path

import numpy as np


class CorruptCheckpointError(ValueError):
    """A checkpoint file fails a consistency check; `path` is the damaged file."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path


_TABLE_MAGIC = 0xDB4775248B80FB57  # the last 8 bytes of every table file
_TF_DTYPES = {  # TensorFlow's DataType enum -> NumPy (little-endian)
    1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 17: "<u2", 19: "<f2",
    22: "<u4", 23: "<u8",
}


def read_tf_checkpoint(ckpt_path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a TensorFlow (V2 format) checkpoint, as NumPy arrays, without TensorFlow.

    Each tensor's bytes are checked against the CRC-32C checksum stored in the index,
    as TensorFlow does, so a damaged data file is an error instead of wrong weights.
    """
    prefix = str(ckpt_path)
    index_path = Path(prefix + ".index")
    if not index_path.is_file():
        raise FileNotFoundError(f"No checkpoint index at {index_path}.")
    try:
        table = _read_table(index_path.read_bytes())
        header = _parse_proto(table.pop(b"", b""))
        entries = {key.decode("utf-8"): _parse_entry(value) for key, value in table.items()}
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as err:
        raise CorruptCheckpointError(index_path, f"{index_path} is corrupt or not a TensorFlow checkpoint "
                                                 f"index ({err}).") from None
    if header.get(2, [0])[0] != 0:
        raise ValueError(f"{index_path} stores big-endian tensors, which this reader does not support.")
    num_shards = header.get(1, [1])[0]

    arrays = {}
    for name, entry in entries.items():
        if entry["slices"]:
            raise ValueError(f"Tensor {name!r} is stored in slices (a partitioned variable), which this "
                             "reader does not support; use reader='tensorflow'.")
        if entry["dtype"] not in _TF_DTYPES:
            raise ValueError(f"Tensor {name!r} has TensorFlow dtype {entry['dtype']}, which this reader "
                             "does not support; use reader='tensorflow'.")
        dtype = np.dtype(_TF_DTYPES[entry["dtype"]])
        data_path = Path(f"{prefix}.data-{entry['shard_id']:05d}-of-{num_shards:05d}")
        if int(np.prod(entry["shape"])) * dtype.itemsize != entry["size"]:
            raise CorruptCheckpointError(index_path, f"{index_path} is corrupt: tensor {name!r} of shape "
                                                     f"{entry['shape']} cannot take {entry['size']} bytes.")
        buffer = bytearray(entry["size"])
        if not data_path.is_file():
            raise FileNotFoundError(f"No checkpoint data file at {data_path}.")
        with open(data_path, "rb") as f:
            f.seek(entry["offset"])
            if f.readinto(buffer) != entry["size"]:
                raise CorruptCheckpointError(data_path, f"{data_path} is truncated: tensor {name!r} ends "
                                                        "after the end of the file.")
        if entry["crc32c"] is not None and _unmask_crc(entry["crc32c"]) != crc32c(buffer):
            raise CorruptCheckpointError(data_path, f"{data_path} is corrupt: the bytes of tensor {name!r} "
                                                    "fail their CRC-32C check.")
        arrays[name] = np.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
    return arrays


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A base-128 varint (7 bits per byte, low bits first) at `pos`; returns (value, next pos)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _read_table(data: bytes) -> dict[bytes, bytes]:
    """All key/value pairs of a LevelDB-format table (uncompressed, as TensorFlow writes it).

    The file ends with a 48-byte footer that points to the index block; the index block
    lists the data blocks; each block is followed by a type byte and a masked CRC-32C.
    """
    footer = data[-48:]
    if len(footer) < 48 or struct.unpack("<Q", footer[40:])[0] != _TABLE_MAGIC:
        raise ValueError("the file does not end with the table magic number")
    _, pos = _read_varint(footer, 0)  # metaindex block offset (unused: no filters)
    _, pos = _read_varint(footer, pos)  # metaindex block size
    index_offset, pos = _read_varint(footer, pos)
    index_size, _ = _read_varint(footer, pos)
    entries = {}
    for _, handle in _block_entries(_read_block(data, index_offset, index_size)):
        offset, pos = _read_varint(handle, 0)
        size, _ = _read_varint(handle, pos)
        entries.update(_block_entries(_read_block(data, offset, size)))
    return entries


def _read_block(data: bytes, offset: int, size: int) -> bytes:
    if offset + size + 5 > len(data):
        raise ValueError(f"a block at bytes {offset}..{offset + size} lies beyond the end of the file")
    compression, masked_crc = data[offset + size], struct.unpack_from("<I", data, offset + size + 1)[0]
    if _unmask_crc(masked_crc) != crc32c(data[offset:offset + size + 1]):
        raise ValueError(f"the block at byte {offset} fails its CRC-32C check")
    if compression != 0:
        raise ValueError(f"the block at byte {offset} is compressed (type {compression}), which is not supported")
    return data[offset:offset + size]


def _block_entries(block: bytes):
    """Yield a block's (key, value) pairs. Each key is stored as the number of bytes it
    shares with the previous key plus the bytes that differ; an array of "restart
    points" at the end of the block (its last 4 bytes count them) is not needed here."""
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 * (num_restarts + 1)
    if end < 0:
        raise ValueError("a block's restart array is larger than the block")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _read_varint(block, pos)
        non_shared, pos = _read_varint(block, pos)
        value_length, pos = _read_varint(block, pos)
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_length]
        pos += value_length


def _parse_proto(buf: bytes) -> dict[int, list]:
    """Decode a protocol-buffer message into {field number: [values]} (no schema needed):
    varints become ints, length-delimited fields stay bytes, fixed32 becomes an int."""
    fields, pos = {}, 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        wire_type = tag & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire_type == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire_type == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        else:
            raise ValueError(f"unexpected protocol-buffer wire type {wire_type}")
        fields.setdefault(tag >> 3, []).append(value)
    return fields


def _parse_entry(value: bytes) -> dict:
    """TensorFlow's BundleEntryProto: dtype=1, shape=2 (TensorShapeProto: dim=2, each with
    size=1), shard_id=3, offset=4, size=5, crc32c=6 (fixed32), slices=7. Fields that are
    zero are simply absent from the bytes."""
    fields = _parse_proto(value)
    dims = _parse_proto(fields.get(2, [b""])[0]).get(2, [])
    return {
        "dtype": fields.get(1, [0])[0],
        "shape": [_parse_proto(dim).get(1, [0])[0] for dim in dims],
        "shard_id": fields.get(3, [0])[0],
        "offset": fields.get(4, [0])[0],
        "size": fields.get(5, [0])[0],
        "crc32c": fields.get(6, [None])[0],
        "slices": fields.get(7, []),
    }


# CRC-32C (Castagnoli), the checksum TensorFlow and LevelDB use. The textbook version
# updates a 32-bit state once per byte with a 256-entry table; in Python that is far
# too slow for 500 MB of weights. So `crc32c` cuts the data into 16,384 slices, runs
# one CRC per slice all at once with NumPy (two bytes per step, with a 65,536-entry
# table), and stitches the results together. Stitching works because a CRC is linear:
# running it over n zero bytes is a fixed linear map of its state (`_zeros_operator`).

_CRC_LANES = 16384
_CRC_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reversed


def _make_crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = (table >> np.uint32(1)) ^ np.where(table & np.uint32(1), np.uint32(_CRC_POLY), np.uint32(0))
    return table


_CRC_TABLE = _make_crc_table()  # state after one byte: table[(state ^ byte) & 0xFF] ^ (state >> 8)
_words = np.arange(65536, dtype=np.uint32)
_after_first_byte = _CRC_TABLE[_words & np.uint32(0xFF)] ^ (_words >> np.uint32(8))
_CRC_TABLE_16 = _CRC_TABLE[_after_first_byte & np.uint32(0xFF)] ^ (_after_first_byte >> np.uint32(8))  # two bytes


def _apply_linear(operator: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Apply a linear map of 32-bit states, given as the images of the 32 single bits."""
    out = np.zeros_like(states)
    for bit in range(32):
        out ^= operator[bit] * ((states >> np.uint32(bit)) & np.uint32(1))
    return out


def _zeros_operator(n: int) -> np.ndarray:
    """The linear map of the CRC state that feeding n zero bytes performs."""
    bits = np.uint32(1) << np.arange(32, dtype=np.uint32)
    power = _CRC_TABLE[bits & np.uint32(0xFF)] ^ (bits >> np.uint32(8))  # one zero byte
    result = bits  # the identity
    while n:  # square-and-multiply
        if n & 1:
            result = _apply_linear(power, result)
        power = _apply_linear(power, power)
        n >>= 1
    return result


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of `data` (crc32c(b"123456789") == 0xE3069283)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    words_per_lane = len(buf) // (2 * _CRC_LANES)
    body = 2 * _CRC_LANES * words_per_lane  # bytes handled by the lanes; the rest comes after
    state = 0xFFFFFFFF
    if words_per_lane:
        lanes = buf[:body].view("<u2").reshape(_CRC_LANES, words_per_lane)
        states = np.zeros(_CRC_LANES, dtype=np.uint32)  # every lane starts from 0
        low, looked_up = np.empty_like(states), np.empty_like(states)
        for start in range(0, words_per_lane, 512):  # 512 columns at a time, made contiguous
            for column in np.ascontiguousarray(lanes[:, start:start + 512].T):
                np.bitwise_xor(states, column, out=states)
                np.bitwise_and(states, 0xFFFF, out=low)
                np.right_shift(states, 16, out=states)
                np.take(_CRC_TABLE_16, low, out=looked_up)
                np.bitwise_xor(states, looked_up, out=states)
        # Stitch neighbours pairwise: state(A then B) = zeros_map_len(B)(state(A)) ^ state(B).
        operator = _zeros_operator(2 * words_per_lane)
        while len(states) > 1:
            states = _apply_linear(operator, states[0::2]) ^ states[1::2]
            operator = _apply_linear(operator, operator)
        state = int(_apply_linear(operator, np.array([state], dtype=np.uint32))[0] ^ states[0])
    table = _CRC_TABLE.tolist()
    for byte in buf[body:].tobytes():  # the last few bytes, one at a time
        state = table[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state ^ 0xFFFFFFFF


def _unmask_crc(masked: int) -> int:
    """LevelDB and TensorFlow store CRCs 'masked' (rotated plus a constant) so that the
    CRC of data that itself contains CRCs stays well-behaved. This undoes it."""
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF
