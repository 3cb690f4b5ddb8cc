from __future__ import annotations

import pytest

from calibrant.calibration import CalibSpec, parse_spec
from calibrant.errors import CalibrantError, CalibrationError


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("wiki:128x512", CalibSpec("wiki", (), 128, 512)),
        ("WIKI:4X16", CalibSpec("wiki", (), 4, 16)),
        ("news: 2 x 8 ", CalibSpec("news", (), 2, 8)),
        ("random-vocab:32x2048", CalibSpec("random-vocab", (), 32, 2048)),
        ("file:./my.txt:64x512", CalibSpec("file", ("./my.txt",), 64, 512)),
        ("file:./data.jsonl:text:64x512", CalibSpec("file", ("./data.jsonl", "text"), 64, 512)),
        ("file:/abs/dir/book.txt:paragraphs:1x2", CalibSpec("file", ("/abs/dir/book.txt", "paragraphs"), 1, 2)),
        ("file:./no_suffix:3x4", CalibSpec("file", ("./no_suffix",), 3, 4)),
    ],
)
def test_parse_spec_good(spec, expected):
    parsed = parse_spec(spec)
    assert parsed == expected
    assert parsed.L == expected.seq_len
    assert parse_spec(str(parsed)) == parsed  # canonical form round-trips


def test_parse_spec_file_path_with_colon_that_exists(tmp_path):
    f = tmp_path / "odd:name.txt"
    f.write_text("hello")
    assert parse_spec(f"file:{f}:2x3").options == (str(f),)


@pytest.mark.parametrize(
    "spec",
    ["wiki", "wiki:128", "wiki:0x512", "wiki:128x0", "wiki:-1x5", "wiki:axb", ":4x4", "file::4x4", "wiki::a:4x4",
     "128x512", ""],
)
def test_parse_spec_bad(spec):
    with pytest.raises(CalibrationError) as err:
        parse_spec(spec)
    msg = str(err.value)
    assert "SOURCE[:options]:NxL" in msg and "\n" not in msg
    assert isinstance(err.value, CalibrantError)
