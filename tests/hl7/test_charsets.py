"""MSH-18 character sets: the mapping, and decoding/encoding a PAM FR ADT in each of them.

All patients are fictional.
"""

from __future__ import annotations

import codecs
import string

import pytest

from gateway.core.errors import EncodingError
from gateway.hl7.charsets import CHARSETS, DEFAULT_CHARSET, codec_for
from gateway.hl7.er7 import Message

FRENCH = "Françoise Lefèvre-Ça, né à Besançon, 3 € "


def adt(
    charset: str,
    *,
    name: str = "LEFÈVRE-ÇA^Françoise",
    street: str = "12 rue des Écoles",
    city: str = "Besançon",
    note: str = FRENCH,
) -> str:
    """A PAM FR ADT^A01 with MSH-18 = ``charset`` ("" leaves MSH-18 empty)."""
    return (
        "\r".join(
            [
                "MSH|^~\\&|GAM|CHU_FICTIF|PASSERELLE|CHU_FICTIF|20240315103000||ADT^A01^ADT_A01|MSG0001|P"
                f"|2.5^FRA^2.10|||AL|NE|FRA|{charset}|FRA",
                "EVN||20240315103000",
                f"PID|||123456^^^CHU_FICTIF&1.2.250.1.999.1&ISO^PI||{name}^^^Mme^^L||19840715|F|||"
                f"{street}^^{city}^^25000^FRA^H",
                "PV1||I|CARDIO^101^1^CHU_FICTIF",
                f"NTE|1||{note}",
                "ZBE|MVT0001^CHU_FICTIF|20240315103000||INSERT|N",
            ]
        )
        + "\r"
    )


# -- the table -------------------------------------------------------------


def test_table_0211_core_names() -> None:
    assert CHARSETS["ASCII"] == "ascii"
    assert CHARSETS["8859/1"] == "latin-1"
    assert CHARSETS["8859/15"] == "iso8859_15"
    assert CHARSETS["UNICODE UTF-8"] == "utf-8"
    assert DEFAULT_CHARSET == "ASCII"
    # Ambiguous names are not guessed.
    assert "UNICODE" not in CHARSETS


def test_every_codec_exists_and_is_ascii_compatible() -> None:
    # decode() reads MSH-18 from the raw bytes before decoding: that needs ASCII supersets.
    ascii_text = string.printable
    for name, codec in CHARSETS.items():
        codecs.lookup(codec)
        assert ascii_text.encode(codec) == ascii_text.encode("ascii"), name


def test_mapping_is_read_only() -> None:
    with pytest.raises(TypeError):
        CHARSETS["UTF8"] = "utf-8"  # type: ignore[index]


@pytest.mark.parametrize(
    ("value", "codec"),
    [("ASCII", "ascii"), (" 8859/1 ", "latin-1"), ("8859/15", "iso8859_15"), ("UNICODE UTF-8 ", "utf-8")],
)
def test_codec_for_strips_spaces(value: str, codec: str) -> None:
    assert codec_for(value) == codec


@pytest.mark.parametrize(
    "value", ["UTF-8", "utf-8", "unicode utf-8", "8859-1", "UNICODE", "latin1", "ISO IR87"]
)
def test_codec_for_unknown_names(value: str) -> None:
    with pytest.raises(EncodingError) as info:
        codec_for(value)
    assert info.value.location == "MSH-18"
    assert value in info.value.message


def test_codec_for_empty_is_an_error_not_a_guess() -> None:
    with pytest.raises(EncodingError):
        codec_for("  ")


# -- one PAM FR ADT per charset ----------------------------------------------


@pytest.mark.parametrize("charset", ["8859/15", "UNICODE UTF-8"])
def test_adt_with_euro(charset: str) -> None:
    raw = adt(charset).encode(CHARSETS[charset])
    msg = Message.decode(raw)
    assert msg.charset == charset
    assert msg.codec == CHARSETS[charset]
    assert msg.get("PID-5.1") == "LEFÈVRE-ÇA"
    assert msg.get("PID-5.2") == "Françoise"
    assert msg.get("PID-11.3") == "Besançon"
    assert msg.get("NTE-3") == FRENCH
    assert msg.encode() == raw
    # A real re-encoding (not the cached bytes) gives the same bytes too.
    msg.set("NTE-3", FRENCH)
    assert msg.encode() == raw


def test_adt_in_8859_1() -> None:
    note = FRENCH.replace("€", "EUR")  # € does not exist in 8859/1
    raw = adt("8859/1", note=note).encode("latin-1")
    msg = Message.decode(raw)
    assert msg.codec == "latin-1"
    assert msg.get("NTE-3") == note
    assert msg.get("PID-5.1") == "LEFÈVRE-ÇA"
    assert msg.encode() == raw
    msg.set("PID-5.2", "Françoise-Élodie")
    assert "Françoise-Élodie".encode("latin-1") in msg.encode()


def test_8859_1_and_8859_15_differ_on_0xa4() -> None:
    raw = adt("8859/15").encode("iso8859_15")
    assert b"\xa4" in raw  # the euro sign
    assert Message.decode(raw).get("NTE-3").endswith("3 € ")
    as_latin1 = raw.replace(b"8859/15", b"8859/1")
    assert Message.decode(as_latin1).get("NTE-3").endswith("3 ¤ ")


def test_adt_in_ascii() -> None:
    plain = {"name": "LEFEVRE^Francoise", "street": "12 rue des Ecoles", "city": "Besancon"}
    raw = adt("ASCII", **plain, note="Francoise, nee a Besancon").encode("ascii")
    msg = Message.decode(raw)
    assert msg.codec == "ascii"
    assert msg.get("PID-5.2") == "Francoise"
    assert msg.encode() == raw
    msg.set("PID-5.2", "Françoise")
    with pytest.raises(EncodingError) as info:
        msg.encode()
    assert info.value.location == "MSH-18"
    assert "U+00E7" in info.value.message
    assert "PID-5" in info.value.message


# -- undecodable and unknown -------------------------------------------------


def test_latin1_byte_under_ascii_is_an_encoding_error() -> None:
    plain = {"name": "LEFEVRE^Francoise", "street": "12 rue des Ecoles", "city": "Besancon"}
    raw = adt("ASCII", **plain, note="n\xe9e").encode("latin-1")
    offset = raw.index(b"\xe9")
    with pytest.raises(EncodingError) as info:
        Message.decode(raw)
    assert info.value.location == "MSH-18"
    assert f"offset {offset}" in info.value.message
    assert "NTE-3" in info.value.message
    # The text names the position, never the bytes themselves.
    assert "\\xe9" not in info.value.message
    assert "é" not in info.value.message
    assert "nee" not in info.value.message


def test_invalid_utf8_sequence() -> None:
    raw = adt("UNICODE UTF-8").encode("utf-8").replace("Besançon".encode(), b"Besan\xc3\x28on", 1)
    offset = raw.index(b"\xc3\x28")
    with pytest.raises(EncodingError) as info:
        Message.decode(raw)
    assert f"offset {offset}" in info.value.message
    assert "PID-11" in info.value.message


def test_utf8_text_declared_as_latin1_is_not_guessed() -> None:
    # Valid 8859/1 bytes (mojibake), decoded as declared: never "fixed" behind the sender's back.
    raw = adt("8859/1").replace("€", "EUR").encode("utf-8")
    assert Message.decode(raw).get("PID-5.2") == "FranÃ§oise"


def test_unknown_charset_is_an_encoding_error() -> None:
    raw = adt("UTF-8").encode("utf-8")
    with pytest.raises(EncodingError) as info:
        Message.decode(raw)
    assert info.value.location == "MSH-18"
    assert "UTF-8" in info.value.message


def test_non_ascii_charset_name() -> None:
    raw = adt("ÜTF", note="").encode("latin-1")
    with pytest.raises(EncodingError):
        Message.decode(raw)


def test_unknown_charset_on_parse_too() -> None:
    with pytest.raises(EncodingError):
        Message.parse(adt("KOI8-R"))


def test_empty_msh18_uses_the_default() -> None:
    raw = adt("", note="n\xe9e").replace("€", "").encode("latin-1")
    msg = Message.decode(raw, default_charset="8859/1")
    assert msg.charset == "8859/1"
    assert msg.codec == "latin-1"
    assert msg.get("NTE-3") == "née"
    # HL7's own default is ASCII: the same bytes are then undecodable.
    with pytest.raises(EncodingError):
        Message.decode(raw)


def test_empty_msh18_default_ascii() -> None:
    text = "MSH|^~\\&|GAM|CHU_FICTIF|||20240315||ADT^A01|1|P|2.5\rPID|||1\r"
    msg = Message.decode(text.encode("ascii"))
    assert msg.charset == "ASCII"
    assert msg.codec == "ascii"
    assert Message.parse(text).charset == "ASCII"
    assert Message.parse(text, default_charset="UNICODE UTF-8").codec == "utf-8"


def test_unknown_default_charset() -> None:
    with pytest.raises(EncodingError):
        Message.decode(b"MSH|^~\\&|A\r", default_charset="WHATEVER")


def test_msh18_first_repetition_and_spaces() -> None:
    raw = adt(" 8859/15 ~UNICODE UTF-8").encode("iso8859_15")
    msg = Message.decode(raw)
    assert msg.charset == "8859/15"
    assert msg.get("NTE-3") == FRENCH


def test_utf8_bom_is_skipped_and_kept_on_unchanged_encode() -> None:
    raw = b"\xef\xbb\xbf" + adt("UNICODE UTF-8").encode("utf-8")
    msg = Message.decode(raw)
    assert msg.get("PID-5.2") == "Françoise"
    assert msg.encode() == raw
    assert msg.to_er7() == adt("UNICODE UTF-8")
    msg.set("MSH-10", "MSG0002")
    assert not msg.encode().startswith(b"\xef\xbb\xbf")


def test_bom_counts_in_error_offsets() -> None:
    # "Françoise" loses the second byte of its ç: the first invalid byte in the message.
    raw = b"\xef\xbb\xbf" + adt("UNICODE UTF-8").encode("utf-8").replace(b"\xc3\xa7", b"\xc3", 1)
    offset = raw.index(b"Fran\xc3o") + 4
    with pytest.raises(EncodingError) as info:
        Message.decode(raw)
    assert f"offset {offset} " in info.value.message


# -- encoding to another charset ---------------------------------------------


def test_encode_to_another_charset_writes_msh18_in_the_output_only() -> None:
    msg = Message.decode(adt("UNICODE UTF-8").encode("utf-8"))
    out = msg.encode("8859/15")
    assert b"|8859/15|" in out
    again = Message.decode(out)
    assert again.charset == "8859/15"
    assert again.get("NTE-3") == FRENCH
    assert msg.charset == "UNICODE UTF-8"  # the message itself is unchanged
    assert msg.get("MSH-18") == "UNICODE UTF-8"


def test_encode_to_a_charset_lacking_a_character() -> None:
    msg = Message.decode(adt("UNICODE UTF-8").encode("utf-8"))
    with pytest.raises(EncodingError) as info:
        msg.encode("8859/1")  # no €
    assert "U+20AC" in info.value.message
    assert "NTE-3" in info.value.message


def test_encode_grows_msh_to_reach_msh18() -> None:
    msg = Message.parse("MSH|^~\\&|GAM|CHU_FICTIF\rPID|||1^^^X\r", default_charset="UNICODE UTF-8")
    out = msg.encode("8859/1")
    # MSH-5 to MSH-17 are empty: 14 separators between MSH-4 and MSH-18.
    assert out == b"MSH|^~\\&|GAM|CHU_FICTIF" + b"|" * 14 + b"8859/1\rPID|||1^^^X\r"
    assert Message.decode(out).charset == "8859/1"


def test_encode_to_unknown_charset() -> None:
    msg = Message.parse(adt("UNICODE UTF-8"))
    with pytest.raises(EncodingError):
        msg.encode("EBCDIC")
