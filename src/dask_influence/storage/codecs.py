"""The codecs of every array this library writes: zstd, then a CRC32C checksum.

Its own module so that the modules that create arrays (:mod:`.layout`, :mod:`.factors`, the
index's and the evaluation's arrays) share it without importing each other.
"""

from __future__ import annotations


def codecs() -> dict:
    """zstd, then a CRC32C checksum: truncation or bit flips fail to decode.

    Returns the keyword arguments of ``zarr.Group.create_array`` (``{"compressors": [...]}``)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {"compressors": [ZstdCodec(level=0), Crc32cCodec()]}


def checksum_only() -> dict:
    """A CRC32C checksum without compression (arrays of float factors, which do not compress and are read
    back often): the keyword arguments of ``zarr.Group.create_array``."""
    from zarr.codecs import Crc32cCodec

    return {"compressors": [Crc32cCodec()]}
