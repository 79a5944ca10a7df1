"""Streamed token ids -> streamed text for one answer, with stop strings.

Each step decodes only a short window of recent ids (the prefix/read offsets of vLLM's detokenizer), so an
answer of n tokens costs O(n), not O(n^2): the window starts one piece before the new ids, which keeps
tokenizers that drop a leading space at the start of a decode (SentencePiece) consistent.
A piece ending in an incomplete UTF-8 character waits for the next ids.

Stop strings end the text before the first match and are not part of it. Text that could still grow
into a stop string (a suffix of the text that is a prefix of some stop string) is held back until it
cannot.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from .. import QconvError


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        if any(not s for s in stop):
            raise QconvError("a stop string is empty")
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded last step; ids[read:] are new
        self.text = ""               # all text decoded so far
        self.sent = 0                # characters of text already handed out
        self.stopped = False         # a stop string matched: nothing more comes out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one id; returns the text that is now certain (possibly '')."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def feed_all(self, token_ids: Iterable[int]) -> Iterator[str]:
        """The text of streamed ids, piece by piece (empty pieces skipped), up to a stop string or the end.
        Closing this iterator closes ``token_ids`` too, so a generator behind it stops at once."""
        try:
            for t in token_ids:
                if piece := self.push(t):
                    yield piece
                if self.stopped:
                    return
            if piece := self.finish():
                yield piece
        finally:
            if hasattr(token_ids, "close"):
                token_ids.close()

    def finish(self) -> str:
        """The answer ended: whatever is left, an incomplete character included (as U+FFFD)."""
        if self.stopped:
            return ""
        if self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(before):]
            self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # a match cannot start before `sent`: the held-back tail covers every partial match
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._partial_stop()
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def _partial_stop(self) -> int:
        """Length of the longest suffix of text (after `sent`) that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
