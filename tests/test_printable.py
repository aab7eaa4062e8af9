"""common.printable: the rules, checked character by character; the fast path for plain ASCII text among them."""

import unicodedata

from common.printable import escaped, printable

SAMPLED = [chr(code) for code in range(0x800)] + list("\u061c\u200e\u200f\u202a\u202e\u2028\u2029\u2066\u2069\ud800")


def must_be_spelled(char):
    bidi_controls = "\u061c\u200e\u200f\u202a\u202e\u2066\u2069"
    return unicodedata.category(char) in {"Cc", "Zl", "Zp", "Cs"} or char in bidi_controls


def test_escaped_spells_out_exactly_the_control_characters_alone_and_among_plain_text():
    for char in SAMPLED:
        for text in (char, f"run 5 {char} done"):
            shown = escaped(text)
            assert (char in shown) != must_be_spelled(char), repr(char)
            assert not any(must_be_spelled(each) for each in shown), repr(char)


def test_escaped_keeps_what_it_is_told_to_keep():
    assert escaped("a\nb\tc\x1b", keep="\n\t") == "a\nb\tc\\x1b"


def test_printable_keeps_printable_ascii_only():
    for char in SAMPLED:
        assert printable(f"x{char}y") == (f"x{char}y" if " " <= char <= "~" else "x?y"), repr(char)
