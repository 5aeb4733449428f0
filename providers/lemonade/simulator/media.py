"""Deterministic fake payloads: hashes, words, PNG/WAV/MP3 bytes, multipart."""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Any


def stable_hash(*parts: Any) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def words_of(value: Any) -> list[str]:
    """Every word of the text inside a (possibly nested) OpenAI message payload."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [w for item in value for w in words_of(item)]
    if isinstance(value, dict):
        return [w for key in ("content", "text", "input_text") for w in words_of(value.get(key))]
    return []


def png_bytes(width: int, height: int, seed: bytes) -> bytes:
    """A real, solid-colour RGB PNG (so clients that decode images are happy)."""
    width, height = max(1, min(width, 1024)), max(1, min(height, 1024))
    row = b"\x00" + bytes(seed[:3]) * width
    raw = row * height

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def wav_bytes(seconds: float = 0.25, rate: int = 24000) -> bytes:
    """A valid mono 16-bit PCM WAV of silence."""
    data = b"\x00\x00" * int(rate * seconds)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", len(data)) + data)


def mp3_bytes(frames: int = 10) -> bytes:
    # An empty ID3v2.4 tag (what Kokoro's encoder writes first), then MPEG-1 Layer III,
    # 128 kbit/s, 44.1 kHz: 417-byte frames; zero payload decodes to silence.
    return b"ID3\x04\x00\x00\x00\x00\x00\x00" + (b"\xff\xfb\x90\x64" + b"\x00" * 413) * frames


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name → (filename, content)."""
    boundary = _multipart_boundary(content_type)
    if not boundary:
        return {}
    result: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        if part.startswith(b"\r\n"):
            part = part[2:]
        head, _, content = part.partition(b"\r\n\r\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        name, filename = _part_disposition(head)
        if name:
            result[name] = (filename, content)
    return result


def _multipart_boundary(content_type: str) -> str:
    boundary = ""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    return boundary


def _part_disposition(head: bytes) -> tuple[str | None, str | None]:
    """A part's field name and filename, from its Content-Disposition header."""
    name, filename = None, None
    for line in head.decode("utf-8", "replace").split("\r\n"):
        if line.lower().startswith("content-disposition"):
            for item in line.split(";")[1:]:
                key, _, value = item.strip().partition("=")
                if key == "name":
                    name = value.strip('"')
                elif key == "filename":
                    filename = value.strip('"')
    return name, filename
