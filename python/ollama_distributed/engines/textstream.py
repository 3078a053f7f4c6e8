"""Turning a stream of token bytes into text, honouring stop sequences.

Token pieces can split a UTF-8 character or the start of a stop sequence, so
text is held back until it can no longer be either.
"""

from __future__ import annotations

import codecs


class StopStream:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Text safe to emit now. After a stop sequence, `stopped` is set."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        if not self.stops:
            out, self._pending = self._pending, ""
            return out
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out
