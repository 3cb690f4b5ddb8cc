"""argparse value types shared by the ``calibrant`` command and its subcommand modules."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (batch sizes, lengths, counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_chat_template_option(parser: argparse.ArgumentParser) -> None:
    """``--chat-template FILE``: the Jinja chat template chat-formatted data renders through."""
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template file for SOURCE:chat calibration and CORPUS:chat evaluation "
                             "(default: the tokenizer's own; a saved model carries the one used)")


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def byte_size(text: str) -> int:
    """argparse type: a size in bytes, e.g. ``512M``, ``2G``, ``1.5GiB`` or ``1000000``."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 512M, 2G or 1.5GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])
