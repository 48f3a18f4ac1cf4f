"""Fuzzed NIfTI (.nii, .nii.gz) and PNG files for the hostile-input harness (issue 15).

Every file is derived, with one fixed seed, from a few small valid bases (PNGs of every colour type
and bit depth, NIfTI-1/2 volumes of several data types) by one mutation of a named category:
header field values, size claims, truncations, byte flips, chunk or gzip damage, odd data types,
NaN/Inf data, odd dimensions and orientation/affine oddities. `fuzz_cases(seed)` gives the list;
`Case.write(folder)` stores one. Each case also names its base, so that the harness can pair it
with a matching valid image or mask (its `base_shape`).
"""

from __future__ import annotations

import gzip
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

SEED = 20261201
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


@dataclass(frozen=True)
class Case:
    """One fuzzed file: `data` stored as `<name><ext>`; category: the mutation family; base_shape:
    the (H, W) or (X, Y, Z) of the valid file it was derived from (for a matching mask);
    must_refuse: the file is damaged beyond doubt (pixel or voxel data missing, a size its data
    cannot fill, NaN/Inf intensities), so that segmenting it at all would be silent garbage."""

    name: str
    category: str
    ext: str
    data: bytes
    base_shape: tuple[int, ...]
    must_refuse: bool = False

    @property
    def filename(self) -> str:
        return f"{self.name}{self.ext}"

    def write(self, folder: Path) -> Path:
        path = folder / self.filename
        path.write_bytes(self.data)
        return path


# ------------------------------------------------------------------------------------------------
# PNG


def png_chunk(kind: bytes, data: bytes, crc: bool = True) -> bytes:
    """One PNG chunk: length, type, data and CRC (a wrong CRC when crc is False)."""
    value = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", value ^ (0 if crc else 1))


def png_raw_rows(pixels: np.ndarray, depth: int) -> bytes:
    """Filter-0 scanlines of (H, W, C) samples packed at `depth` bits (big-endian for 16)."""
    height = pixels.shape[0]
    rows = []
    for y in range(height):
        row = pixels[y].reshape(-1)
        if depth == 16:
            packed = row.astype(">u2").tobytes()
        elif depth == 8:
            packed = row.astype(np.uint8).tobytes()
        else:
            packed = np.packbits(
                np.unpackbits(row.astype(np.uint8)[:, None], axis=1)[:, 8 - depth :].reshape(-1)
            ).tobytes()
        rows.append(b"\x00" + packed)
    return b"".join(rows)


@dataclass(frozen=True)
class PngBase:
    """A valid PNG's parts: header fields, the raw (filtered) image data, extra chunks before
    IDAT."""

    name: str
    width: int
    height: int
    depth: int
    colour: int
    raw: bytes
    extra: tuple[tuple[bytes, bytes], ...] = ()

    def ihdr(self, **fields: int) -> bytes:
        values = {
            "width": self.width,
            "height": self.height,
            "depth": self.depth,
            "colour": self.colour,
            "compression": 0,
            "filter": 0,
            "interlace": 0,
            **fields,
        }
        return struct.pack(
            ">IIBBBBB",
            values["width"] & 0xFFFFFFFF,
            values["height"] & 0xFFFFFFFF,
            values["depth"],
            values["colour"],
            values["compression"],
            values["filter"],
            values["interlace"],
        )

    def encode(
        self,
        ihdr: bytes | None = None,
        idat: bytes | None = None,
        extra: tuple[tuple[bytes, bytes], ...] | None = None,
        idat_chunks: int = 1,
        end: bool = True,
    ) -> bytes:
        """The PNG file, with optionally replaced header, compressed data or extra chunks."""
        compressed = zlib.compress(self.raw, 9) if idat is None else idat
        parts = [PNG_SIGNATURE, png_chunk(b"IHDR", self.ihdr() if ihdr is None else ihdr)]
        parts += [png_chunk(k, d) for k, d in (self.extra if extra is None else extra)]
        step = max(1, -(-len(compressed) // idat_chunks))
        for start in range(0, max(len(compressed), 1), step):
            parts.append(png_chunk(b"IDAT", compressed[start : start + step]))
        if end:
            parts.append(png_chunk(b"IEND", b""))
        return b"".join(parts)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


def disk(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float in [0, 1]: a bright disk on noise."""
    ys, xs = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.35, 0.65, 2) * (height, width)
    inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= (0.25 * min(height, width)) ** 2
    return np.clip(0.25 + 0.5 * inside + rng.normal(0, 0.05, (height, width)), 0, 1)


def png_bases(rng: np.random.Generator) -> list[PngBase]:
    """Valid PNGs: grey 1/2/4/8/16 bits, RGB 8/16, grey+alpha, RGBA, palette (with PLTE, tRNS)."""
    bases = []
    for name, depth, colour, channels in (
        ("grey8", 8, 0, 1),
        ("grey16", 16, 0, 1),
        ("grey1", 1, 0, 1),
        ("grey2", 2, 0, 1),
        ("grey4", 4, 0, 1),
        ("rgb8", 8, 2, 3),
        ("rgb16", 16, 2, 3),
        ("greyalpha8", 8, 4, 2),
        ("rgba8", 8, 6, 4),
        ("palette8", 8, 3, 1),
        ("palette4", 4, 3, 1),
    ):
        height, width = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        levels = (1 << depth) - 1 if colour != 3 else (15 if depth == 8 else (1 << depth) - 1)
        pixels = np.round(disk(height, width, rng) * levels).astype(np.int64)
        pixels = np.repeat(pixels[:, :, None], channels, axis=2)
        if channels in (2, 4):
            pixels[:, :, -1] = levels
        extra: tuple[tuple[bytes, bytes], ...] = ()
        if colour == 3:
            palette = bytes(int(v) for i in range(levels + 1) for v in (i * 16 % 256,) * 3)
            extra = ((b"PLTE", palette), (b"tRNS", b"\xff" * (levels + 1)))
        bases.append(
            PngBase(name, width, height, depth, colour, png_raw_rows(pixels, depth), extra)
        )
    return bases


def png_cases(rng: np.random.Generator) -> Iterator[Case]:
    """Fuzzed PNGs, about 1,000, by category."""
    bases = png_bases(rng)

    def case(category: str, base: PngBase, tag: str, data: bytes, refuse: bool = False) -> Case:
        return Case(f"{category}-{base.name}-{tag}", category, ".png", data, base.shape, refuse)

    for base in bases:
        yield case("png-valid", base, "plain", base.encode())
        yield case("png-valid", base, "split-idat", base.encode(idat_chunks=7))
    # header fields, CRC kept right (so the decoder reaches them)
    field_values = {
        "width": [0, 1, 2, 3, 255, 9000, 65535, 2**24, 2**31 - 1, 2**31, 2**32 - 1],
        "height": [0, 1, 2, 3, 255, 9000, 65535, 2**24, 2**31 - 1, 2**31, 2**32 - 1],
        "depth": [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 32, 255],
        "colour": [0, 1, 2, 3, 4, 5, 6, 7, 8, 255],
        "compression": [1, 2, 255],
        "filter": [1, 2, 255],
        "interlace": [1, 2, 255],
    }
    for base in bases:
        for key, values in field_values.items():
            for value in values:
                if value == getattr(base, key, None) or (key == "colour" and value == base.colour):
                    continue
                yield case(
                    "png-header", base, f"{key}{value}", base.encode(ihdr=base.ihdr(**{key: value}))
                )
    # size claims: a tiny valid-looking stream under a huge or mismatched header
    for base in bases:
        for width, height in (
            (9000, 9000),
            (30000, 30000),
            (100000, 1),
            (1, 100000),
            (16384, 16384),
        ):
            ihdr = base.ihdr(width=width, height=height)
            yield case(
                "png-size-claim", base, f"{width}x{height}", base.encode(ihdr=ihdr), refuse=True
            )
            row = b"\x00" * (1 + (width * base.depth + 7) // 8)
            tiny = zlib.compress(row * min(height, 4), 9)
            yield case(
                "png-size-claim",
                base,
                f"{width}x{height}-rows",
                base.encode(ihdr=ihdr, idat=tiny),
                # complete (an honest image) when every row is there and holds one sample a pixel
                refuse=height > 4 or PNG_SAMPLES[base.colour] > 1,
            )
        # a zlib bomb: the header's size, honestly compressed (deflate 1032:1), under the pixel cap
        big = 4096 if base.depth >= 8 else 8192
        raw = (b"\x00" + b"\x00" * ((big * base.depth * PNG_SAMPLES[base.colour] + 7) // 8)) * 256
        ihdr = base.ihdr(width=big, height=256)
        yield case(
            "png-size-claim",
            base,
            f"bomb{big}x256",
            base.encode(ihdr=ihdr, idat=zlib.compress(raw, 9)),
        )
    # truncations
    for base in bases:
        data = base.encode()
        cuts = sorted(
            {0, 1, 7, 8, 12, 16, 20, 29, 33, len(data) - 1, len(data) - 12, len(data) - 13}
        )
        cuts += [int(c) for c in rng.integers(33, len(data), 14)]
        for cut in sorted(set(c for c in cuts if 0 <= c < len(data))):
            # IEND, the CRC, the zlib checksum and a margin of deflate data: rows are missing
            missing_rows = cut < len(data) - 12 - 4 - 4 - 24
            yield case("png-truncated", base, f"at{cut}", data[:cut], refuse=missing_rows)
        compressed = zlib.compress(base.raw, 9)
        for fraction in (0.1, 0.5, 0.9):
            half = zlib.compress(base.raw[: int(len(base.raw) * fraction)], 9)
            yield case(
                "png-truncated", base, f"clean-stream{fraction}", base.encode(idat=half), True
            )
            yield case(
                "png-truncated",
                base,
                f"cut-stream{fraction}",
                base.encode(idat=compressed[: int(len(compressed) * fraction)]),
                True,
            )
    # byte flips: anywhere (CRC usually wrong) and inside the compressed data with CRCs fixed
    for base in bases:
        data = base.encode()
        compressed = zlib.compress(base.raw, 9)
        for trial in range(14):
            flipped = bytearray(data)
            for at in rng.integers(0, len(data), int(rng.integers(1, 17))):
                flipped[at] ^= int(rng.integers(1, 256))
            yield case("png-byteflip", base, f"any{trial}", bytes(flipped))
        for trial in range(10):
            flipped = bytearray(compressed)
            for at in rng.integers(0, len(compressed), int(rng.integers(1, 9))):
                flipped[at] ^= int(rng.integers(1, 256))
            yield case("png-byteflip", base, f"idat{trial}", base.encode(idat=bytes(flipped)))
        for trial in range(4):  # filter-type bytes out of range (rows decoded with filter 5..255)
            raw = bytearray(base.raw)
            stride = len(raw) // base.height
            for row in rng.integers(0, base.height, 3):
                raw[int(row) * stride] = int(rng.integers(5, 256))
            yield case(
                "png-byteflip", base, f"filter{trial}", base.encode(idat=zlib.compress(bytes(raw)))
            )
    # chunk structure
    for base in bases:
        ihdr = png_chunk(b"IHDR", base.ihdr())
        idat = png_chunk(b"IDAT", zlib.compress(base.raw))
        iend = png_chunk(b"IEND", b"")
        extra = b"".join(png_chunk(k, d) for k, d in base.extra)
        big_length = PNG_SIGNATURE + ihdr + extra + struct.pack(">I", 2**31 - 1) + idat[4:] + iend
        variants = {
            "no-iend": base.encode(end=False),
            "no-idat": PNG_SIGNATURE + ihdr + extra + iend,
            "no-ihdr": PNG_SIGNATURE + extra + idat + iend,
            "two-ihdr": PNG_SIGNATURE + ihdr + ihdr + extra + idat + iend,
            "idat-length-huge": big_length,
            "ihdr-bad-crc": PNG_SIGNATURE
            + png_chunk(b"IHDR", base.ihdr(), crc=False)
            + extra
            + idat
            + iend,
            "idat-bad-crc": PNG_SIGNATURE
            + ihdr
            + extra
            + png_chunk(b"IDAT", zlib.compress(base.raw), crc=False)
            + iend,
            "unknown-critical": PNG_SIGNATURE
            + ihdr
            + png_chunk(b"ZZZZ", b"x" * 9)
            + extra
            + idat
            + iend,
            "unknown-ancillary": PNG_SIGNATURE
            + ihdr
            + png_chunk(b"zzZz", b"x" * 9)
            + extra
            + idat
            + iend,
            "trailing-garbage": base.encode() + bytes(rng.integers(0, 256, 200, dtype=np.uint8)),
            "data-after-stream": base.encode(idat=zlib.compress(base.raw) + b"\x00" * 64),
            "raw-extra-rows": base.encode(
                idat=zlib.compress(base.raw + base.raw[: len(base.raw) // 2])
            ),
            "ihdr-short": PNG_SIGNATURE + png_chunk(b"IHDR", base.ihdr()[:9]) + extra + idat + iend,
            "ihdr-long": PNG_SIGNATURE
            + png_chunk(b"IHDR", base.ihdr() + b"\x00" * 8)
            + extra
            + idat
            + iend,
            "huge-text": PNG_SIGNATURE
            + ihdr
            + png_chunk(b"tEXt", b"k\x00" + b"v" * 2_000_000)
            + extra
            + idat
            + iend,
            "ztxt-bomb": PNG_SIGNATURE
            + ihdr
            + png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"v" * 50_000_000, 9))
            + extra
            + idat
            + iend,
            "iccp-garbage": PNG_SIGNATURE
            + ihdr
            + png_chunk(b"iCCP", b"icc\x00\x00" + b"garbage")
            + extra
            + idat
            + iend,
            "plte-in-grey": PNG_SIGNATURE
            + ihdr
            + png_chunk(b"PLTE", b"\x00" * 768)
            + extra
            + idat
            + iend,
            "no-plte": base.encode(extra=()),
            "short-plte": base.encode(extra=((b"PLTE", b"\x00\x00\x00"),)),
            "long-trns": base.encode(extra=(*base.extra, (b"tRNS", b"\x00" * 300))),
            "gama-zero": base.encode(extra=((b"gAMA", b"\x00" * 4), *base.extra)),
            "phys-huge": base.encode(extra=((b"pHYs", b"\xff" * 9), *base.extra)),
        }
        for tag, data in variants.items():
            yield case("png-chunks", base, tag, data)
    # not a PNG behind the name
    other = [
        ("empty", b""),
        ("signature-only", PNG_SIGNATURE),
        ("garbage", bytes(rng.integers(0, 256, 4096, dtype=np.uint8))),
        ("text", b"this is not an image\n" * 20),
        ("jpeg-magic", b"\xff\xd8\xff\xe0" + bytes(200)),
        ("gif-magic", b"GIF89a" + bytes(200)),
        ("nifti-inside", nifti_bytes(np.zeros((4, 4, 4), np.uint8), np.eye(4))),
        ("zeros", bytes(1024)),
    ]
    shape = bases[0].shape
    for tag, data in other:
        yield Case(f"png-not-png-{tag}", "png-not-png", ".png", data, shape)


# ------------------------------------------------------------------------------------------------
# NIfTI

# NIfTI-1 header fields: name -> (byte offset, struct format)
NIFTI1_FIELDS = {
    "sizeof_hdr": (0, "i"),
    "dim_info": (39, "B"),
    "dim0": (40, "h"),
    "dim1": (42, "h"),
    "dim2": (44, "h"),
    "dim3": (46, "h"),
    "dim4": (48, "h"),
    "dim5": (50, "h"),
    "intent_code": (68, "h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    "pixdim0": (76, "f"),
    "pixdim1": (80, "f"),
    "pixdim2": (84, "f"),
    "pixdim3": (88, "f"),
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
    "slice_code": (122, "B"),
    "xyzt_units": (123, "B"),
    "cal_max": (124, "f"),
    "cal_min": (128, "f"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    "quatern_b": (256, "f"),
    "quatern_c": (260, "f"),
    "quatern_d": (264, "f"),
    "qoffset_x": (268, "f"),
    "srow_x0": (280, "f"),
    "srow_x3": (292, "f"),
    "srow_y1": (300, "f"),
    "srow_z2": (320, "f"),
}

NAN, INF = float("nan"), float("inf")
FIELD_VALUES: dict[str, list[float]] = {
    "sizeof_hdr": [0, 1, 347, 349, 540, -348, 2**31 - 1],
    "dim_info": [255, 0x3F],
    "dim0": [-1, 0, 1, 2, 4, 5, 7, 8, 9, 100, 32767, -32768],
    "dim1": [-1, 0, 1, 2, 32767, -32768],
    "dim2": [-1, 0, 1, 32767],
    "dim3": [-1, 0, 1, 2, 32767],
    "dim4": [-1, 0, 2, 32767],
    "dim5": [-1, 0, 3],
    "intent_code": [1007, 2001, 9999, -1],
    "datatype": [0, 1, 3, 9, 32, 128, 255, 1536, 1792, 2048, 2304, 9999, -1],
    "bitpix": [0, 1, 7, 13, 64, 256, -8],
    "pixdim0": [0, -1, 2, NAN, INF],
    "pixdim1": [0, -1, 1e-30, 1e30, NAN, INF, -INF],
    "pixdim2": [0, NAN, INF],
    "pixdim3": [0, -2, NAN, 1e38],
    "vox_offset": [0, 10, 347, 348, 351, 353, 1e6, 1e30, -352, NAN, INF],
    "scl_slope": [0, -1, 1e-30, 1e38, NAN, INF, -INF],
    "scl_inter": [1e38, NAN, INF, -INF],
    "slice_code": [7, 255],
    "xyzt_units": [255, 0x07, 0x38],
    "cal_max": [NAN, INF, -1e38],
    "cal_min": [NAN, INF, 1e38],
    "qform_code": [-1, 5, 7, 255, 32767],
    "sform_code": [-1, 5, 7, 255, 32767],
    "quatern_b": [1.5, -2, NAN, INF, 1e30],
    "quatern_c": [1.5, NAN, INF],
    "quatern_d": [1.0, -1.0, NAN, 2],
    "qoffset_x": [NAN, INF, 1e38],
    "srow_x0": [0, NAN, INF, 1e38, -1e-30],
    "srow_x3": [NAN, INF, -1e38],
    "srow_y1": [0, NAN, -1],
    "srow_z2": [0, INF, 1e-38],
}


def nifti_bytes(
    array: np.ndarray,
    affine: np.ndarray,
    version: int = 1,
    qform_only: bool = False,
    codes: tuple[int, int] | None = None,
) -> bytes:
    """A single-file NIfTI-1 or NIfTI-2 image of `array` under `affine` (.nii bytes)."""
    image_class = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    image = image_class(array, None if qform_only else affine, dtype=array.dtype)
    if qform_only:
        image.set_qform(affine, code=1)
        image.set_sform(None, code=0)
    if codes is not None:
        image.header["qform_code"], image.header["sform_code"] = codes
    image.header.set_xyzt_units("mm", "sec")
    return image.to_bytes()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def patched(data: bytes, offset: int, fmt: str, value: float, big_endian: bool = False) -> bytes:
    """`data` with one header field set (NaN/Inf only go into float fields)."""
    code = (">" if big_endian else "<") + fmt
    if fmt != "f":
        value = int(value) & ((1 << (8 * struct.calcsize(fmt))) - 1)
        code = code.replace(fmt, fmt.upper()) if fmt in "ih" else code
    return data[:offset] + struct.pack(code, value) + data[offset + struct.calcsize(fmt) :]


def rotation(angles: tuple[float, float, float]) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def volume(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(X, Y, Z) float in [0, 1]: a bright ball on noise."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2).sum(axis=0) <= 0.4
    return np.clip(0.25 + 0.5 * inside + rng.normal(0, 0.05, shape), 0, 1)


def nifti_cases(rng: np.random.Generator) -> Iterator[Case]:
    """Fuzzed NIfTI files, about 900, by category (half .nii, half .nii.gz where it applies)."""
    shape = (20, 18, 6)
    base = volume(shape, rng)
    spacing = np.diag([0.8, 0.8, 2.5, 1.0])

    def both(
        category: str,
        tag: str,
        data: bytes,
        base_shape: tuple[int, ...] = shape,
        refuse: bool = False,
    ) -> Iterator[Case]:
        yield Case(f"{category}-{tag}", category, ".nii", data, base_shape, refuse)
        yield Case(f"{category}-{tag}-gz", category, ".nii.gz", gz(data), base_shape, refuse)

    # valid controls and odd data types
    dtypes: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = [
        ("uint8", lambda v: np.round(v * 255).astype(np.uint8)),
        ("int8", lambda v: np.round(v * 127).astype(np.int8)),
        ("int16", lambda v: np.round(v * 3000 - 1000).astype(np.int16)),
        ("uint16", lambda v: np.round(v * 60000).astype(np.uint16)),
        ("int32", lambda v: np.round(v * 1e6).astype(np.int32)),
        ("uint32", lambda v: np.round(v * 4e9).astype(np.uint32)),
        ("int64", lambda v: np.round(v * 1e12).astype(np.int64)),
        ("uint64", lambda v: np.round(v * 1e18).astype(np.uint64)),
        ("float32", lambda v: v.astype(np.float32)),
        ("float64", lambda v: v.astype(np.float64)),
        ("float32-huge", lambda v: (v * 3e38).astype(np.float32)),
        ("float64-huge", lambda v: v * 1e300),
        ("float32-tiny", lambda v: (v * 1e-40).astype(np.float32)),
        ("int16-extremes", lambda v: np.where(v > 0.5, 32767, -32768).astype(np.int16)),
        ("constant", lambda v: np.full(v.shape, 7, np.int16)),
        ("zeros", lambda v: np.zeros(v.shape, np.float32)),
        ("complex64", lambda v: v.astype(np.complex64)),
        ("complex128", lambda v: v.astype(np.complex128)),
        ("bool-as-uint8", lambda v: (v > 0.5).astype(np.uint8)),
        (
            "rgb24",
            lambda v: (
                np.stack([np.round(v * 255)] * 3, axis=-1)
                .astype(np.uint8)
                .view(np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]))
                .reshape(v.shape)
            ),
        ),
    ]
    for tag, convert in dtypes:
        for version in (1, 2):
            yield from both(
                "nii-dtype", f"{tag}-v{version}", nifti_bytes(convert(base), spacing, version)
            )
    # NaN / Inf data and scaling
    for tag, values in (
        ("one-nan", np.where(np.arange(base.size).reshape(shape) == 17, np.nan, base)),
        ("many-nan", np.where(rng.random(shape) < 0.2, np.nan, base)),
        ("all-nan", np.full(shape, np.nan)),
        ("pos-inf", np.where(rng.random(shape) < 0.01, np.inf, base)),
        ("neg-inf", np.where(rng.random(shape) < 0.01, -np.inf, base)),
        ("nan-slice", np.concatenate([base[..., :3], np.full((*shape[:2], 3), np.nan)], axis=2)),
    ):
        for dtype in (np.float32, np.float64):
            yield from both(
                "nii-nonfinite",
                f"{tag}-{np.dtype(dtype).name}",
                nifti_bytes(values.astype(dtype), spacing),
                refuse=True,
            )
    ints = nifti_bytes(np.round(base * 255).astype(np.int16), spacing)
    for field in ("scl_slope", "scl_inter"):
        for value in FIELD_VALUES[field]:
            offset, fmt = NIFTI1_FIELDS[field]
            yield from both("nii-nonfinite", f"{field}{value}", patched(ints, offset, fmt, value))
    # orientation and affine oddities (valid headers)
    affines: dict[str, np.ndarray] = {
        "ras": spacing,
        "lps": np.diag([-0.8, -0.8, 2.5, 1.0]),
        "las": np.diag([-0.8, 0.8, 2.5, 1.0]),
        "permuted-zxy": np.array([[0, 0, 2.5, 0], [0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1.0]]),
        "permuted-flipped": np.array(
            [[0, -0.8, 0, 5], [0, 0, -2.5, 3], [-0.8, 0, 0, 1], [0, 0, 0, 1.0]]
        ),
        "oblique-30": np.vstack(
            [np.hstack([rotation((0.5, 0.2, 0.1)) * 0.8, [[1], [2], [3]]]), [0, 0, 0, 1]]
        ),
        "oblique-45": np.vstack(
            [np.hstack([rotation((np.pi / 4, np.pi / 4, 0)), [[0], [0], [0]]]), [0, 0, 0, 1]]
        ),
        "singular": np.diag([0.8, 0.8, 0.0, 1.0]),
        "all-zero": np.zeros((4, 4)),
        "nan": np.diag([np.nan, 0.8, 2.5, 1.0]),
        "inf-offset": np.array(
            [[0.8, 0, 0, np.inf], [0, 0.8, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]]
        ),
        "huge": np.diag([1e30, 1e30, 1e30, 1.0]),
        "tiny": np.diag([1e-30, 1e-30, 1e-30, 1.0]),
        "sheared": np.array([[0.8, 0.7, 0, 0], [0, 0.8, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]]),
        "rank2": np.array([[0.8, 0.8, 0, 0], [0.8, 0.8, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]]),
        "mirrored": np.diag([0.8, 0.8, -2.5, 1.0]),
        "anisotropic": np.diag([0.1, 5.0, 40.0, 1.0]),
    }
    data = np.round(base * 255).astype(np.int16)
    for tag, affine in affines.items():
        for version in (1, 2):
            try:
                encoded = nifti_bytes(data, affine, version)
            except Exception:  # noqa: BLE001 (nibabel refuses to store it: write the fields by hand)
                encoded = nifti_bytes(data, spacing, version)
                if version == 1:
                    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
                        for col in range(4):
                            offset = {"srow_x": 280, "srow_y": 296, "srow_z": 312}[name] + 4 * col
                            encoded = patched(encoded, offset, "f", float(affine[row, col]))
            yield from both("nii-affine", f"{tag}-v{version}", encoded)
        usable = np.all(np.isfinite(affine)) and np.linalg.matrix_rank(affine[:3, :3]) == 3
        qform = nifti_bytes(data, affine if usable else spacing, qform_only=True)
        yield from both("nii-affine", f"{tag}-qform-only", qform)
    for codes in ((0, 0), (0, 2), (3, 0), (4, 4)):
        yield from both(
            "nii-affine",
            f"codes{codes[0]}{codes[1]}",
            nifti_bytes(data, affines["lps"], codes=codes),
        )
    # header field mutations (NIfTI-1, little and big endian)
    little = nifti_bytes(data, affines["oblique-30"])
    big_header = nib.Nifti1Header(endianness=">")
    big = nib.Nifti1Image(data, affines["oblique-30"], header=big_header).to_bytes()
    for field, values in FIELD_VALUES.items():
        offset, fmt = NIFTI1_FIELDS[field]
        for value in values:
            yield from both("nii-header", f"{field}{value}", patched(little, offset, fmt, value))
    for field in ("dim0", "dim1", "datatype", "vox_offset", "sizeof_hdr", "scl_slope"):
        offset, fmt = NIFTI1_FIELDS[field]
        for value in FIELD_VALUES[field][:5]:
            yield from both(
                "nii-header", f"{field}{value}-be", patched(big, offset, fmt, value, True)
            )
    for magic in (b"ni1\x00", b"n+2\x00", b"\x00\x00\x00\x00", b"n+1x", b"ABCD"):
        yield from both("nii-header", f"magic-{magic.hex()}", little[:344] + magic + little[348:])
    # size claims: dims far beyond the stored data
    for dims in (
        (32767, 32767, 32767),
        (10000, 10000, 1),
        (20, 18, 32767),
        (4096, 4096, 64),
        (1, 1, 2**15 - 1),
    ):
        claimed = little
        for n, value in enumerate(dims):
            claimed = patched(claimed, 42 + 2 * n, "h", value)
        yield from both("nii-size-claim", "x".join(map(str, dims)), claimed, refuse=True)
    for dims in ((2**31, 2**31, 1), (10**6, 10**6, 10**6), (2**62, 1, 1)):
        v2 = bytearray(nifti_bytes(data, spacing, version=2))
        for n, value in enumerate(dims):
            v2[16 + 8 * (n + 1) : 24 + 8 * (n + 1)] = struct.pack("<q", value)
        yield from both("nii-size-claim", "v2-" + "x".join(map(str, dims)), bytes(v2), refuse=True)
    # odd dimensions (valid files)
    odd_shapes = {
        "2d": (20, 18),
        "2d-z1": (20, 18, 1),
        "x1": (1, 18, 6),
        "y1": (20, 1, 6),
        "x1y1": (1, 1, 6),
        "1x1x1": (1, 1, 1),
        "4d-t1": (20, 18, 6, 1),
        "4d-t3": (20, 18, 6, 3),
        "5d": (20, 18, 6, 1, 2),
        "thin-long": (2, 3, 300),
        "channels-3": (20, 18, 3),
        "channels-4": (20, 18, 4),
        "z2": (20, 18, 2),
    }
    for tag, odd in odd_shapes.items():
        values = np.round(rng.random(odd) * 200).astype(np.int16)
        yield from both("nii-dims", tag, nifti_bytes(values, spacing), odd)
    # truncations (.nii cut; .nii.gz: the gzip stream cut)
    for cut in sorted(
        {
            0,
            1,
            100,
            347,
            348,
            351,
            352,
            353,
            len(little) // 2,
            len(little) - 1,
            *rng.integers(352, len(little), 8).tolist(),
        }
    ):
        yield Case(f"nii-truncated-at{cut}", "nii-truncated", ".nii", little[:cut], shape, True)
    compressed = gz(little)
    for cut in sorted(
        {
            0,
            2,
            10,
            20,
            len(compressed) // 4,
            len(compressed) // 2,
            len(compressed) - 8,
            len(compressed) - 1,
            *rng.integers(10, len(compressed), 8).tolist(),
        }
    ):
        yield Case(
            f"nii-truncated-gz-at{cut}", "nii-truncated", ".nii.gz", compressed[:cut], shape, True
        )
    # byte flips: header, data, and the gzip stream
    for trial in range(40):
        flipped = bytearray(little)
        for at in rng.integers(0, 348, int(rng.integers(1, 6))):
            flipped[at] ^= int(rng.integers(1, 256))
        yield from both("nii-byteflip", f"header{trial}", bytes(flipped))
    float_data = nifti_bytes(base.astype(np.float32), spacing)
    for trial in range(20):
        flipped = bytearray(float_data)
        for at in rng.integers(352, len(float_data), int(rng.integers(1, 40))):
            flipped[at] = 0xFF  # 0xFF bytes make NaN floats
        yield from both("nii-byteflip", f"data{trial}", bytes(flipped))
    for trial in range(30):
        flipped = bytearray(compressed)
        for at in rng.integers(10, len(compressed), int(rng.integers(1, 6))):
            flipped[at] ^= int(rng.integers(1, 256))
        yield Case(
            f"nii-byteflip-gzstream{trial}", "nii-byteflip", ".nii.gz", bytes(flipped), shape
        )
    # gzip oddities
    gz_variants = {
        "crc-wrong": compressed[:-8] + bytes(4) + compressed[-4:],
        "isize-wrong": compressed[:-4] + struct.pack("<I", 2**32 - 1),
        "two-members": compressed + compressed,
        "trailing-garbage": compressed + b"garbage" * 10,
        "trailing-zeros": compressed + bytes(512),
        "plain-nii-named-gz": little,
        "gz-of-garbage": gz(bytes(rng.integers(0, 256, 4096, dtype=np.uint8))),
        "gz-empty": gz(b""),
        "gz-of-png": gz(png_bases(np.random.default_rng(0))[0].encode()),
        "bomb": gz(
            patched(patched(patched(little, 42, "h", 1000), 44, "h", 1000), 46, "h", 30)[:352]
            + bytes(1000 * 1000 * 30 * 2)
        ),
    }
    for tag, variant in gz_variants.items():
        damaged = tag in ("crc-wrong", "isize-wrong")  # the voxels cannot be trusted
        yield Case(f"nii-gzip-{tag}", "nii-gzip", ".nii.gz", variant, shape, damaged)
    for tag, variant in {
        "gz-named-nii": compressed,
        "empty": b"",
        "garbage": bytes(rng.integers(0, 256, 2048, dtype=np.uint8)),
        "png-named-nii": png_bases(np.random.default_rng(0))[0].encode(),
    }.items():
        yield Case(f"nii-gzip-{tag}", "nii-gzip", ".nii", variant, shape)
    # extensions: a header extension block of odd sizes
    for esize in (0, 8, 15, 1 << 20, 2**31 - 1, -16):
        with_ext = little[:348] + b"\x01\x00\x00\x00" + struct.pack("<ii", esize, 4) + little[352:]
        with_ext = patched(with_ext, 108, "f", 352.0)
        yield from both("nii-header", f"extension{esize}", with_ext)


def fuzz_cases(seed: int = SEED) -> list[Case]:
    """Every fuzzed file, PNG first, in a fixed order for `seed`."""
    rng = np.random.default_rng(seed)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = list(png_cases(rng)) + list(nifti_cases(rng))
    names = [c.filename for c in cases]
    assert len(set(names)) == len(names), "fuzzed file names must be unique"
    return cases


def counts(cases: list[Case]) -> dict[str, int]:
    """Cases per category, in first-seen order."""
    result: dict[str, int] = {}
    for case in cases:
        result[case.category] = result.get(case.category, 0) + 1
    return result
