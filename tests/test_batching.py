"""Batches on their own: compressed as they grow, sealed at close, the same bytes as sent."""

from __future__ import annotations

import base64
import gzip
import hashlib
import random
import zlib

import pytest
import zstandard

from fastingest.batching import Batch, Encoder, KeyMaker, Upload

KEYS = KeyMaker("in/", "ab12", 3, host="h")
T0 = 1700000000.0


def decompress(body: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.decompress(body)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(body).read()
    return body


def chunk(i: int) -> bytes:
    # Varied enough that zstd and gzip emit blocks before the end, not only at finish().
    return b"".join(b'{"i":%d,"j":%d,"pad":"%s"}\n' % (i, j, b"%x" % (i * j)) for j in range(20))


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_a_batch_encoded_round_by_round_seals_to_exactly_its_chunks(compression):
    batch = Batch(T0, 7, 1 << 30, 1 << 30, compression)
    chunks = [chunk(i) for i in range(3000)]
    for start in range(0, len(chunks), 64):  # as the batcher does: one encode() per round
        for i, c in enumerate(chunks[start : start + 64]):
            batch.add(c, 20, T0 + start + i)
        batch.encode()
        assert batch.pending == []
    batch.add(b'{"last":1}\n', 1, T0 + 9999)  # left pending: close() encodes it
    upload = batch.close(KEYS)
    raw = b"".join(chunks) + b'{"last":1}\n'
    assert decompress(upload.body, compression) == raw
    assert upload.raw_size == len(raw)
    assert upload.payloads == 3000 * 20 + 1
    assert upload.seqs == range(7, 7 + 3001) and upload.marker == 7
    assert upload.first == T0 and upload.last == T0 + 9999
    assert upload.sha256 == hashlib.sha256(upload.body).hexdigest()  # what sha256sum says
    assert upload.content_md5 == base64.b64encode(hashlib.md5(upload.body).digest()).decode()
    assert upload.parts == []  # sealed: only the body is held
    if compression != "none":
        assert len(upload.body) < len(raw) / 2
    sealed = upload.body
    upload.seal()  # a sealed upload stays as it is
    assert upload.body is sealed


def test_encoder_output_is_the_same_whole_or_in_pieces():
    data = b"".join(chunk(i) for i in range(500))
    whole, pieces = Encoder("zstd"), Encoder("zstd")
    whole.feed(data)
    for i in range(0, len(data), 1000):
        pieces.feed(data[i : i + 1000])
    a, b = whole.finish(), pieces.finish()
    assert a == b  # the same body, so the same hashes
    assert decompress(a[0], "zstd") == decompress(b[0], "zstd") == data


def test_an_empty_encoder_is_still_a_valid_object():
    for compression in ("zstd", "gzip"):
        body, sha256, _ = Encoder(compression).finish()
        assert decompress(body, compression) == b""
        assert sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_a_damaged_body_does_not_decompress_to_wrong_ndjson(compression):
    """The hashes cover the body as stored; the format's own checksum covers the NDJSON."""
    # Random bytes are stored uncompressed, so a flipped bit in the middle changes the
    # output and nothing else: only a checksum of the NDJSON can notice.
    rnd = random.Random(5)
    encoder = Encoder(compression)
    encoder.feed(bytes(rnd.getrandbits(8) for _ in range(20000)))
    body = bytearray(encoder.finish()[0])
    body[len(body) // 2] ^= 1
    with pytest.raises((zstandard.ZstdError, gzip.BadGzipFile, zlib.error)):
        decompress(bytes(body), compression)


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="unknown compression"):
        Encoder("lz4")


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_seal_uses_the_uploads_own_compression(compression):
    """A replayed batch keeps the compression its key names, whatever this run's default."""
    parts = [chunk(i) for i in range(10)]
    upload = Upload(
        "k", list(parts), sum(map(len, parts)), 200, T0, T0, "x", compression=compression
    )
    upload.seal()
    assert decompress(upload.body, compression) == b"".join(parts)
    assert upload.parts == []
