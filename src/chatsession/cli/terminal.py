"""Text made safe to print on a terminal.

Model output, tool output and stored values can hold terminal control
sequences: an OSC 52 sequence writes the user's clipboard, OSC 0 retitles the
window, CSI sequences move the cursor or erase the screen, and a lone
backspace or carriage return can hide what was written before it. Everything
the command line prints that it did not write itself goes through
:class:`TerminalSanitizer` (for streamed text) or :func:`sanitize` (for whole
strings):

- escape sequences are dropped whole: ``ESC [`` (CSI), ``ESC ]`` (OSC),
  ``ESC P`` / ``X`` / ``^`` / ``_`` (DCS, SOS, PM, APC: strings up to BEL or
  ST), ``ESC`` with intermediate bytes (nF) and two-byte escapes, and the same
  sequences introduced by their 8-bit C1 forms (U+009B, U+009D, ...);
- other C0 controls and DEL are shown as their Unicode control pictures
  (``␇`` for BEL, ``␈`` for backspace), other C1 controls as ``�``;
- ``\\n`` and ``\\t`` are kept, ``\\r`` is dropped (``\\r\\n`` becomes ``\\n``).

A sequence split across streamed deltas is still recognised: the sanitizer
keeps its parser state between :meth:`TerminalSanitizer.feed` calls and drops
what it has not yet seen the end of. A string sequence (OSC, DCS, ...) also
ends at a newline, so an unterminated one hides at most the rest of its line.
"""

from __future__ import annotations

import re

__all__ = ["TerminalSanitizer", "sanitize"]

# characters that need the parser: C0 controls but \t and \n, DEL, C1 controls
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_GROUND, _ESCAPE, _INTERMEDIATE, _CSI, _STRING = range(5)

_ESC = "\x1b"
_BEL = "\x07"
_ST = "\x9c"
# what follows ESC (or the C1 form alone) to open a CSI or a string sequence
_ESCAPE_NEXT = {"[": _CSI, "]": _STRING, "P": _STRING, "X": _STRING, "^": _STRING, "_": _STRING}
_C1_OPENS = {"\x9b": _CSI, "\x9d": _STRING, "\x90": _STRING, "\x98": _STRING, "\x9e": _STRING}
_C1_OPENS["\x9f"] = _STRING


def _visible(char: str) -> str:
    """How a lone control character is shown."""
    code = ord(char)
    if code < 0x20:
        return chr(0x2400 + code)  # the control pictures block: ␀ .. ␟
    if code == 0x7F:
        return "\u2421"  # ␡
    return "\ufffd"


class TerminalSanitizer:
    """Strips terminal control sequences from text fed to it piece by piece.

    Use one instance per stream (one model answer): ``feed`` each delta and
    print what it returns; call :meth:`flush` when the stream ends.
    """

    def __init__(self) -> None:
        self._state = _GROUND

    @property
    def pending(self) -> bool:
        """True while an escape sequence has started and not ended."""
        return self._state != _GROUND

    def feed(self, text: str) -> str:
        """The printable part of ``text``, given everything fed before it."""
        if self._state == _GROUND and _UNSAFE.search(text) is None:
            return text
        out: list[str] = []
        state = self._state
        i, end = 0, len(text)
        while i < end:
            if state == _GROUND:
                found = _UNSAFE.search(text, i)
                if found is None:
                    out.append(text[i:])
                    break
                start = found.start()
                if start > i:
                    out.append(text[i:start])
                char = text[start]
                i = start + 1
                if char == _ESC:
                    state = _ESCAPE
                elif char in _C1_OPENS:
                    state = _C1_OPENS[char]
                elif char != "\r":
                    out.append(_visible(char))
                continue
            char = text[i]
            code = ord(char)
            if state == _STRING:
                i += 1
                if char in (_BEL, _ST):
                    state = _GROUND
                elif char == _ESC:
                    state = _ESCAPE  # ESC \ (ST) ends it; any other ESC starts a new sequence
                elif code < 0x20:
                    state = _GROUND  # a newline (or another control) ends an unterminated string
                    i -= 1
                continue
            if state == _ESCAPE:
                if char == _ESC:
                    i += 1
                elif char in _ESCAPE_NEXT:
                    state = _ESCAPE_NEXT[char]
                    i += 1
                elif 0x20 <= code <= 0x2F:
                    state = _INTERMEDIATE
                    i += 1
                elif 0x30 <= code <= 0x7E:
                    state = _GROUND  # a complete two-character escape (ESC 7, ESC c, ESC \)
                    i += 1
                else:
                    state = _GROUND  # not a sequence: drop the ESC, read the character again
                continue
            if state == _INTERMEDIATE:
                if 0x20 <= code <= 0x2F:
                    i += 1
                elif 0x30 <= code <= 0x7E:
                    state = _GROUND
                    i += 1
                else:
                    state = _GROUND
                continue
            # _CSI: parameter bytes 0x30-0x3F, intermediate bytes 0x20-0x2F, final 0x40-0x7E
            if 0x20 <= code <= 0x3F:
                i += 1
            elif 0x40 <= code <= 0x7E:
                state = _GROUND
                i += 1
            else:
                state = _GROUND  # a malformed sequence ends here; read the character again
        self._state = state
        return "".join(out)

    def flush(self) -> str:
        """End the stream: an unfinished sequence is dropped. Returns ``""``."""
        self._state = _GROUND
        return ""


def sanitize(text: str) -> str:
    """``text`` without terminal control sequences (see the module docstring)."""
    if _UNSAFE.search(text) is None:
        return text
    return TerminalSanitizer().feed(text)
