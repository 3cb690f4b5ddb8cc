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
