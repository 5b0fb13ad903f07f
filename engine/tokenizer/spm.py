"""SentencePiece-style BPE (``tokenizer.ggml.model = llama``): LLaMA and friends.

The text (spaces already spelled ``▁``, dummy prefix already added by the caller)
starts as one symbol per character. Then, repeatedly, the adjacent pair whose
concatenation is a vocabulary piece with the highest score is merged; ties go to
the leftmost pair. This is sentencepiece's BPE encoder and llama.cpp's
llm_tokenizer_spm. Characters that end up in no piece fall back to ``<0xNN>``
byte tokens (one per UTF-8 byte), or to the unknown token if there are none.

Only normal, user-defined and unused pieces take part in merges: sentencepiece
keeps control, unknown and byte pieces out of its piece table, so text such as
``<s>`` or ``<0x41>`` is never merged into those ids.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from engine.tokenizer.unicode import to_utf8


class SentencePieceBPE:
    """Encodes escaped text fragments (``▁`` for spaces) to ids."""

    def __init__(
        self,
        mergeable: dict[str, tuple[float, int]],
        unused_ids: frozenset[int],
        byte_ids: Sequence[int | None],
        unk_id: int | None,
    ) -> None:
        # piece -> (score, id), for the piece types merges may produce
        self.mergeable = mergeable
        self.unused_ids = unused_ids
        self.byte_ids = byte_ids
        self.unk_id = unk_id

    def encode(self, text: str) -> list[int]:
        symbols: list[str | None] = list(text)
        n = len(symbols)
        if n == 0:
            return []
        next_index = list(range(1, n + 1))
        next_index[-1] = -1
        prev_index = list(range(-1, n - 1))
        mergeable = self.mergeable
        # merged piece -> the two pieces it was made from, to split unused pieces again
        made_from: dict[str, tuple[str, str]] = {}

        # Heap of (-score, left index, merged text): the highest score first, ties to
        # the leftmost pair. Stale entries (a side merged away or grown) no longer
        # spell the recorded text and are skipped.
        heap: list[tuple[float, int, str]] = []
        for i in range(n - 1):
            merged = symbols[i] + symbols[i + 1]  # type: ignore[operator]
            found = mergeable.get(merged)
            if found is not None:
                heap.append((-found[0], i, merged))
                made_from[merged] = (symbols[i], symbols[i + 1])  # type: ignore[assignment]
        heapq.heapify(heap)

        while heap:
            _, left, merged = heapq.heappop(heap)
            left_text = symbols[left]
            right = next_index[left]
            if left_text is None or right < 0:
                continue
            right_text = symbols[right]
            if right_text is None or left_text + right_text != merged:
                continue
            symbols[left] = merged
            symbols[right] = None
            after = next_index[right]
            next_index[left] = after
            if after >= 0:
                prev_index[after] = left
            before = prev_index[left]
            if before >= 0:
                candidate = symbols[before] + merged  # type: ignore[operator]
                found = mergeable.get(candidate)
                if found is not None:
                    heapq.heappush(heap, (-found[0], before, candidate))
                    made_from[candidate] = (symbols[before], merged)  # type: ignore[assignment]
            if after >= 0:
                candidate = merged + symbols[after]  # type: ignore[operator]
                found = mergeable.get(candidate)
                if found is not None:
                    heapq.heappush(heap, (-found[0], left, candidate))
                    made_from[candidate] = (merged, symbols[after])  # type: ignore[assignment]

        ids: list[int] = []
        i = 0
        while i >= 0:
            symbol = symbols[i]
            assert symbol is not None
            self._emit(symbol, made_from, ids)
            i = next_index[i]
        return ids

    def _emit(self, piece: str, made_from: dict[str, tuple[str, str]], ids: list[int]) -> None:
        found = self.mergeable.get(piece)
        if found is not None:
            token = found[1]
            if token not in self.unused_ids or piece not in made_from:
                ids.append(token)
                return
            # An unused piece may steer merging but never appears in the output:
            # sentencepiece splits it back into the two pieces it was made from.
            left, right = made_from[piece]
            self._emit(left, made_from, ids)
            self._emit(right, made_from, ids)
            return
        for byte in to_utf8(piece):
            token = self.byte_ids[byte]
            if token is None:
                token = self.unk_id
            if token is not None:
                ids.append(token)
