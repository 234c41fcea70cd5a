"""What a separation lets its caller choose, stated once: device, precision, overlap,
output format and bit depth.

The library checks a choice here (`parse_format`, `parse_bit_depth`), and the front ends
offer the same lists: the command line builds its parser from them, and the Cog model's
literal choices are tested equal to them. Light to import: no audio or torch library.
"""

from __future__ import annotations

from stemsep.errors import AudioEncodeError

DEVICES = ("auto", "cpu", "cuda")  # auto: a CUDA GPU if there is one (stemsep.runner.resolve_device)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # of the transformers; auto: bf16 on a GPU, fp32 on the CPU
MAX_OVERLAP = 16  # windows covering each sample: 1 to this
PCM_FORMATS = ("wav", "flac")  # exact: the stems add up to the mix bit for bit
COMPRESSED_FORMATS = ("mp3", "m4a", "opus")  # lossy (stemsep.compressed)
OUTPUT_FORMATS = PCM_FORMATS + COMPRESSED_FORMATS
DEFAULT_FORMAT = "wav"
BIT_DEPTHS = ("auto", 16, 24, 32)  # of WAV and FLAC; auto keeps the input's precision, 32 is float
DEFAULT_BIT_DEPTH = "auto"


def parse_format(output_format: str, formats: tuple[str, ...] = OUTPUT_FORMATS, kind: str = "output") -> str:
    """`output_format` in lower case, if it is one of `formats`; else AudioEncodeError naming
    it as a `kind` format."""
    fmt = output_format.strip().lower() if isinstance(output_format, str) else output_format
    if fmt not in formats:
        raise AudioEncodeError(f"{kind} format {output_format!r} is not one of {', '.join(formats)}")
    return fmt


def parse_bit_depth(bit_depth: str | int) -> str | int:
    """One of BIT_DEPTHS ("auto" or an int) from a str or int; else AudioEncodeError."""
    if isinstance(bit_depth, str) and bit_depth.strip().isdigit():
        bit_depth = int(bit_depth)
    if isinstance(bit_depth, str):
        bit_depth = bit_depth.strip().lower()
    if isinstance(bit_depth, bool) or bit_depth not in BIT_DEPTHS:
        raise AudioEncodeError(f"bit depth {bit_depth!r} is not one of {', '.join(map(str, BIT_DEPTHS))}")
    return bit_depth
