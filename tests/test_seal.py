"""The seal of JSON documents (docs/FORMAT.md section 2): format v2 checksums the stored bytes after a fixed
31-byte prefix, so any conforming JSON writer can produce a document and any conforming parser can read it;
format v1 documents (CPython's exact layout) keep unsealing."""
from __future__ import annotations

import glob
import json
import os

import pytest

from asyncckpt import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedStateError
from asyncckpt import format as fmt

V1 = os.path.join(os.path.dirname(__file__), "fixtures", "v1")

DOC = {
    "format_version": 2, "rank": 0, "files": {"rank00000-0.bin": 12},
    "tensors": {"optimizer/state/~i0/exp_avg": {"dtype": "float32", "shape": [3], "device": "cpu"}},
    "skeleton": {"eps": 1e-08, "lr": 0.001, "big": 10 ** 40, "neg": -0.0, "text": "é ü ∑ 😀 \u2028 \x00 \"q\" \\",
                 "list": [1, 2.5, None, True, False, []], "empty": {}},
}


def _seal_remainder(rest: str) -> bytes:
    """A v2 document written the way another JSON writer might: any formatting, then the prefix over it."""
    data = rest.encode()
    return b'{"checksum":"' + fmt.checksum(data).encode() + b'",' + data


def _seal_v1(doc: dict) -> bytes:
    """Format v1's seal (asyncckpt 0.1.0), to forge v1-sealed documents."""
    body = dict(doc)
    body["checksum"] = fmt.checksum(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return json.dumps(body, indent=1).encode() + b"\n"


def test_round_trip_and_layout():
    data = fmt.seal(DOC)
    assert data.startswith(b'{"checksum":"') and data[29:31] == b'",' and data.endswith(b"\n}\n")
    assert fmt.SEAL_PREFIX_BYTES == 31 and data[13:29] == fmt.checksum(data[31:]).encode()
    assert all(c in b"0123456789abcdef" for c in data[13:29])
    assert fmt.unseal(data, "doc") == DOC
    assert json.loads(data)["checksum"] == data[13:29].decode()  # any JSON parser reads it
    assert b"1e-08" in data and "é".encode() in data  # UTF-8, not \u escapes
    assert fmt.seal(dict(DOC, checksum="0" * 16)) == data  # a stale checksum member is replaced


def test_seal_layout_keeps_large_documents_line_per_entry():
    lines = fmt.seal(DOC).split(b"\n")
    assert lines[1] == b' "format_version": 2,'
    assert b'  "optimizer/state/~i0/exp_avg": {"dtype":"float32","shape":[3],"device":"cpu"}' in lines


def test_every_single_byte_change_is_detected():
    data = fmt.seal(DOC)
    assert len(data) > 300
    for i in range(len(data)):
        for mask in (0x01, 0x20, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            with pytest.raises(CorruptCheckpointError):
                fmt.unseal(bytes(bad), "doc")


@pytest.mark.parametrize("change", [
    lambda d: d + b" ", lambda d: d[:-1], lambda d: d[:-1] + b"\r\n", lambda d: d.replace(b",\n", b", \n", 1),
    lambda d: d.replace(b'\n "rank"', b'\n  "rank"'), lambda d: d.replace(b'\n "rank"', b'\t"rank"'),
    lambda d: d.replace(b'": ', b'":', 1), lambda d: b" " + d, lambda d: b"\xef\xbb\xbf" + d,
], ids=["trailing space", "no final newline", "CRLF", "space before newline", "indent", "tab", "colon",
        "leading space", "BOM"])
def test_whitespace_changes_are_detected(change):
    data = fmt.seal(DOC)
    assert change(data) != data
    with pytest.raises(CorruptCheckpointError):
        fmt.unseal(change(data), "doc")


def test_a_document_from_another_json_writer_verifies():
    """No indentation, another member order, 1e-8, upper-case \\u escapes, escaped slashes, a surrogate pair:
    what a Rust or C++ JSON library may write."""
    rest = ('"rank":0,"format_version":2,"files":{"rank00000-0.bin":12},'
            '"tensors":{"optimizer\\/state\\/~i0\\/exp_avg":{"shape":[3],"dtype":"float32","device":"cpu"}},'
            '"skeleton":{"eps":1e-8,"lr":1.0E-3,"big":10000000000000000000000000000000000000000,"neg":-0.0,'
            '"text":"\\u00E9 \\u00fc \\u2211 \\uD83D\\uDE00 \\u2028 \\u0000 \\"q\\" \\\\",'
            '"list":[1,2.5,null,true,false,[]],"empty":{}}}')
    doc = fmt.unseal(_seal_remainder(rest), "foreign")
    assert doc == DOC and list(doc) == ["rank", "format_version", "files", "tensors", "skeleton"]
    assert doc["skeleton"]["eps"] == 1e-08 and str(doc["skeleton"]["neg"]) == "-0.0"


def test_v1_fixture_documents_still_unseal():
    files = sorted(glob.glob(os.path.join(V1, "*", "*.json")))
    assert len(files) == 6
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        doc = fmt.unseal(data, path)
        assert doc["format_version"] == 1 and "checksum" not in doc
        assert _seal_v1(doc) == data  # the forging helper below writes true v1 seals


def test_a_seal_of_the_wrong_version_is_refused():
    with open(os.path.join(V1, "raw", "manifest.json"), "rb") as f:
        v1 = fmt.unseal(f.read(), "v1")
    with pytest.raises(UnsafeCheckpointError, match="v2 seal on a document of format_version 1"):
        fmt.unseal(fmt.seal(v1), "v1 doc, v2 seal")
    with pytest.raises(UnsafeCheckpointError, match="v1 seal on a document of format_version 2"):
        fmt.unseal(_seal_v1(dict(v1, format_version=2)), "v2 doc, v1 seal")
    with pytest.raises(UnsafeCheckpointError, match="v1 seal"):
        fmt.unseal(_seal_v1({"format": "asyncckpt"}), "no version, v1 seal")


@pytest.mark.parametrize("rest, error", [
    ('"a":NaN}\n', CorruptCheckpointError), ('"a":-Infinity}\n', CorruptCheckpointError),
    ('"a":1e400}\n', CorruptCheckpointError), ('"a":-1E+999}\n', CorruptCheckpointError),
    ('"a":1,"a":2}\n', UnsafeCheckpointError), ('"checksum":"0000000000000000"}\n', UnsafeCheckpointError),
    ('"a":{"b":1,"b":1}}\n', UnsafeCheckpointError),
    ('"a":"\\ud800"}\n', CorruptCheckpointError), ('"a":["x",{"\\uDC00":1}]}\n', CorruptCheckpointError),
    ('"a":"\\ude00\\ud83d"}\n', CorruptCheckpointError), ('"a":01}\n', CorruptCheckpointError),
    ('"a":1,}\n', CorruptCheckpointError), ('"a":1}\n]', CorruptCheckpointError), ("}\n", CorruptCheckpointError),
    ('"a":"tab\there"}\n', CorruptCheckpointError), ("'a':1}\n", CorruptCheckpointError),
], ids=["NaN", "-Infinity", "1e400", "-1E+999", "duplicate key", "second checksum", "nested duplicate",
        "lone high surrogate", "lone low surrogate key", "reversed pair", "leading zero", "trailing comma",
        "extra data", "no member", "raw control character", "single quotes"])
def test_only_strict_json_is_accepted(rest, error):
    with pytest.raises(error) as info:
        fmt.unseal(_seal_remainder(rest), "doc")
    assert type(info.value) is error


@pytest.mark.parametrize("raw", [b"\xed\xa0\x80", b"\xff", b"\xc3", b"\xc0\xaf"],
                         ids=["encoded surrogate", "invalid byte", "cut sequence", "overlong"])
def test_invalid_utf8_is_refused(raw):
    data = _seal_remainder('"a":"x"}\n').replace(b'"x"', b'"' + raw + b'"')
    data = b'{"checksum":"' + fmt.checksum(data[31:]).encode() + b'",' + data[31:]
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        fmt.unseal(data, "doc")


def test_the_prefix_must_be_exact():
    data = fmt.seal(DOC)
    for bad in (data[:13] + data[13:29].upper() + data[29:], data.replace(b'",', b'" ,', 1),
                b'{ "checksum":"' + data[13:], b'{"checksum" :"' + data[13:]):
        with pytest.raises(CorruptCheckpointError):
            fmt.unseal(bad, "doc")


def test_seal_refuses_what_other_parsers_cannot_read():
    with pytest.raises(UnsupportedStateError, match="surrogate"):
        fmt.seal({"skeleton": {"name\udcff": 1}})
    with pytest.raises(ValueError):
        fmt.seal({"skeleton": float("nan")})
    with pytest.raises(ValueError):
        fmt.seal({"checksum": "x"})
    with pytest.raises(TypeError):
        fmt.seal({"files": {1: 2}})
