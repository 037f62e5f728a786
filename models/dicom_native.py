"""Uncompressed little-endian DICOM files read straight from their bytes: the elements a volume needs, pixels.

pydicom builds an object per element and converts each value through its value-representation machinery:
about 2.5 ms for a small MR file, slower than GDCM's reader. A volume needs some twenty elements of a file.
For the two transfer syntaxes that hold pixels as plain little-endian integers (Implicit and Explicit VR
Little Endian, PS3.5 A.1 and A.2) this module walks the element headers with ``struct``, keeps those
elements' values and views the pixel data as a NumPy array: a few hundred microseconds a file.

Every value is what :mod:`models.dicom_frames` gets from pydicom for the same element (one value as a value,
several as a list, text stripped as pydicom strips it), and the pixels are pydicom's, unused high bits cleared
or sign-extended as it does. Whatever this reader does not handle -- a compressed, deflated or big-endian
transfer syntax, a multi-frame or enhanced file, floating-point pixels, colour, non-ASCII text, several values
where one is expected, a value pydicom would reject -- raises :class:`NotNative`, and the caller reads the
file with pydicom.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

#: Explicit VRs whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2); all others have 2 bytes.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
     b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_TRANSFER_SYNTAX_UID = 0x00020010

#: tag -> (keyword, VR) of the elements read; each keyword is one of ``dicom_frames.VOLUME_KEYWORDS``.
_WANTED: dict[int, tuple[str, str]] = {
    0x00080008: ("ImageType", "CS"),
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080060: ("Modality", "CS"),
    0x0008103E: ("SeriesDescription", "LO"),
    0x00180050: ("SliceThickness", "DS"),
    0x00180081: ("EchoTime", "DS"),
    0x00180086: ("EchoNumbers", "IS"),
    0x00180088: ("SpacingBetweenSlices", "DS"),
    0x00181030: ("ProtocolName", "LO"),
    0x00189087: ("DiffusionBValue", "FD"),
    0x00189089: ("DiffusionGradientOrientation", "FD"),
    0x0020000E: ("SeriesInstanceUID", "UI"),
    0x00200032: ("ImagePositionPatient", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"),
    0x00200100: ("TemporalPositionIdentifier", "IS"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280004: ("PhotometricInterpretation", "CS"),
    0x00280006: ("PlanarConfiguration", "US"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280030: ("PixelSpacing", "DS"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280101: ("BitsStored", "US"),
    0x00280102: ("HighBit", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
    _PIXEL_DATA: ("PixelData", "OW"),
}
#: Elements that mean the file is not a plain single-frame image: enhanced functional groups, float pixels,
#: the offset tables of encapsulated pixel data.
_NOT_NATIVE_TAGS = frozenset({0x52009229, 0x52009230, 0x7FE00001, 0x7FE00002, 0x7FE00008, 0x7FE00009})
#: Text elements where pydicom would give a list for several values (what code downstream expects one of).
_SINGLE_TEXT = frozenset({"SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality",
                          "SeriesDescription", "ProtocolName", "PhotometricInterpretation"})

_unpack = struct.unpack_from


class NotNative(Exception):
    """The file is not one this reader handles; read it with pydicom."""


class NativeImage:
    """The volume elements of one uncompressed single-frame file: a read-only stand-in for the pydicom
    Dataset that :func:`models.dicom_frames.read_dataset` would give (``get``, ``in``; pixels by
    :meth:`frames`)."""

    __slots__ = ("_pixel_bytes", "_values")

    def __init__(self, values: dict[str, object], pixel_bytes: bytes | None) -> None:
        self._values = values
        self._pixel_bytes = pixel_bytes

    def get(self, keyword: str, default: object = None) -> object:
        return self._values.get(keyword, default)

    def __contains__(self, keyword: object) -> bool:
        return keyword in self._values

    def frames(self) -> np.ndarray:
        """Stored pixel values as (1, rows, columns), as pydicom's ``pixel_array`` gives them."""
        values = self._values
        rows, columns = values["Rows"], values["Columns"]
        bits_allocated, bits_stored = values["BitsAllocated"], values["BitsStored"]
        dtype = np.dtype(f"<{'i' if values['PixelRepresentation'] else 'u'}{bits_allocated // 8}")
        count = rows * columns  # type: ignore[operator]
        pixels = np.frombuffer(self._pixel_bytes, dtype=dtype, count=count)  # type: ignore[arg-type]
        pixels = pixels.reshape(1, rows, columns).copy()  # type: ignore[arg-type]
        if bits_stored < bits_allocated:  # type: ignore[operator]
            # The bits above Bits Stored carry nothing (PS3.5 8.1.1): pydicom clears them, or sign-extends
            # signed values, by shifting left then right; so do we.
            shift = bits_allocated - bits_stored  # type: ignore[operator]
            np.left_shift(pixels, shift, out=pixels)
            np.right_shift(pixels, shift, out=pixels)
        return pixels


def _element_header(buffer: bytes, offset: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, offset of the value) of the element at ``offset``."""
    group, element = _unpack("<HH", buffer, offset)
    tag = group << 16 | element
    if not explicit or group == 0xFFFE:  # item and delimitation tags carry no VR in either encoding
        return tag, None, _unpack("<L", buffer, offset + 4)[0], offset + 8
    vr = buffer[offset + 4:offset + 6]
    if vr in _LONG_VRS:
        return tag, vr, _unpack("<L", buffer, offset + 8)[0], offset + 12
    if vr in _SHORT_VRS:
        return tag, vr, _unpack("<H", buffer, offset + 6)[0], offset + 8
    raise NotNative(f"unknown VR {vr!r}")


def _skip_undefined_sequence(buffer: bytes, offset: int, explicit: bool) -> int:
    """Offset after a sequence of undefined length whose first item starts at ``offset`` (PS3.5 7.5)."""
    while True:
        tag, _, length, offset = _element_header(buffer, offset, explicit)
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM:
            raise NotNative(f"unexpected tag {tag:08X} in a sequence")
        if length != _UNDEFINED_LENGTH:
            offset += length
            continue
        while True:  # an item of undefined length: its elements up to the item delimiter
            tag, vr, length, offset = _element_header(buffer, offset, explicit)
            if tag == _ITEM_END:
                break
            if length == _UNDEFINED_LENGTH:
                # An explicit-VR UN of undefined length holds implicit-VR items (PS3.5 6.2.2).
                offset = _skip_undefined_sequence(buffer, offset, explicit and vr != b"UN")
            else:
                offset += length
        if offset > len(buffer):
            raise NotNative("truncated sequence")


def _text(raw: bytes) -> str:
    if not raw.isascii():  # pydicom decodes by Specific Character Set; leave that to it
        raise NotNative("non-ASCII text")
    return raw.decode("ascii")


def _strings(text: str) -> str | list[str]:
    """pydicom's multi_string: trailing padding off, split at backslashes, one value unwrapped."""
    items = text.rstrip(" \x00").split("\\")
    return items[0] if len(items) == 1 else items


def _numbers(text: str, integer: bool) -> object:
    value = _strings(text.strip() if not integer else text)
    items = [value] if isinstance(value, str) else value
    if items == [""]:
        return ""
    try:
        numbers = [float(item) for item in items]
    except ValueError:
        raise NotNative(f"not a number: {text!r}") from None
    if integer:
        numbers = [int(n) if n.is_integer() else n for n in numbers]  # type: ignore[misc]
    return numbers[0] if len(numbers) == 1 else numbers


def _binary(raw: bytes, code: str, size: int) -> object:
    if len(raw) % size:
        raise NotNative("binary value of a length that is no multiple of its size")
    count = len(raw) // size
    if count == 0:
        return None
    values = list(_unpack(f"<{count}{code}", raw))
    return values[0] if count == 1 else values


def _value(keyword: str, vr: str, raw: bytes) -> object:
    if vr == "US":
        value = _binary(raw, "H", 2)
        if isinstance(value, list):
            raise NotNative(f"{keyword} holds several values")
        return value
    if vr == "FD":
        return _binary(raw, "d", 8)
    text = _text(raw)
    if vr == "DS":
        return _numbers(text, integer=False)
    if vr == "IS":
        return _numbers(text, integer=True)
    if vr == "UI":
        value = _strings(text.rstrip("\x00 "))
    elif vr == "LO":
        items = [item.rstrip("\x00 ") for item in text.split("\\")]
        value = items[0] if len(items) == 1 else items
    else:  # CS
        value = _strings(text)
    if isinstance(value, list) and keyword in _SINGLE_TEXT:
        raise NotNative(f"{keyword} holds several values")
    return value


def read_native(path: Path) -> NativeImage:
    """The volume elements and pixels of an uncompressed little-endian single-frame file; :class:`NotNative`
    for any other file (and for anything odd about this one), to be read with pydicom instead."""
    buffer = Path(path).read_bytes()
    if buffer[128:132] != b"DICM":
        raise NotNative("no DICOM preamble")
    offset, transfer_syntax = 132, None
    try:
        while offset + 8 <= len(buffer) and _unpack("<H", buffer, offset)[0] == 0x0002:
            tag, _, length, value_at = _element_header(buffer, offset, True)
            offset = value_at + length
            if tag == _TRANSFER_SYNTAX_UID:
                transfer_syntax = _text(buffer[value_at:offset]).rstrip("\x00 ")
        if transfer_syntax not in (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN):
            raise NotNative(f"transfer syntax {transfer_syntax}")
        explicit = transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN

        raw_values: dict[int, tuple[str, bytes]] = {}
        end = len(buffer)
        while offset + 8 <= end:
            tag, vr, length, value_at = _element_header(buffer, offset, explicit)
            if tag in _NOT_NATIVE_TAGS:
                raise NotNative(f"element {tag:08X}")
            if length == _UNDEFINED_LENGTH:
                if tag == _PIXEL_DATA:
                    raise NotNative("encapsulated pixel data")
                offset = _skip_undefined_sequence(buffer, value_at, explicit and vr != b"UN")
                continue
            offset = value_at + length
            if offset > end:
                raise NotNative(f"element {tag:08X} runs past the end of the file")
            wanted = _WANTED.get(tag)
            if wanted is not None:
                keyword, expected_vr = wanted
                if vr is not None and tag != _PIXEL_DATA and vr.decode() != expected_vr:
                    raise NotNative(f"{keyword} with VR {vr!r}")
                raw_values[tag] = (keyword, buffer[value_at:offset])
            if tag == _PIXEL_DATA:
                break
    except struct.error as error:
        raise NotNative(f"truncated: {error}") from None
    except RecursionError:  # sequences nested deeper than Python's stack: pydicom's reader decides
        raise NotNative("sequences nested too deeply") from None

    values: dict[str, object] = {}
    for tag, (keyword, raw) in raw_values.items():
        if tag != _PIXEL_DATA:
            values[keyword] = _value(keyword, _WANTED[tag][1], raw)
    pixel_bytes = raw_values[_PIXEL_DATA][1] if _PIXEL_DATA in raw_values else None
    if pixel_bytes is not None:
        values["PixelData"] = True
        _check_pixel_module(values, len(pixel_bytes))
    return NativeImage(values, pixel_bytes)


def _check_pixel_module(values: dict[str, object], pixel_length: int) -> None:
    """NotNative unless the pixels are one frame of grey-scale integers that pydicom would decode as we do."""
    needed = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel")
    if any(not isinstance(values.get(k), int) for k in needed):
        raise NotNative("incomplete Image Pixel module")
    if values["SamplesPerPixel"] != 1 or values.get("PhotometricInterpretation") not in ("MONOCHROME1",
                                                                                       "MONOCHROME2"):
        raise NotNative("not a grey-scale image")
    if values.get("NumberOfFrames") not in (None, "", 1):
        raise NotNative("multi-frame")
    bits_allocated, bits_stored = values["BitsAllocated"], values["BitsStored"]
    if bits_allocated not in (8, 16, 32) or not 1 <= bits_stored <= bits_allocated:  # type: ignore[operator]
        raise NotNative(f"Bits Allocated {bits_allocated}, Bits Stored {bits_stored}")
    if values["PixelRepresentation"] not in (0, 1) or not values["Rows"] or not values["Columns"]:
        raise NotNative("pixel description pydicom would reject")
    if pixel_length < values["Rows"] * values["Columns"] * bits_allocated // 8:  # type: ignore[operator]
        raise NotNative("less pixel data than Rows x Columns")
