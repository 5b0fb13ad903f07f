"""GBNF grammars (llama.cpp's format) that constrain generation, token by token.

    from engine.grammar import Grammar
    g = Grammar.from_string('root ::= "yes" | "no"')       # or Grammar.from_file, from_json_schema
    model.generate("Answer:", grammar=g)                    # or grammar='root ::= ...' directly

The syntax is llama.cpp's (``grammars/*.gbnf`` parse unchanged): rules ``name ::= alternatives``,
``|``, grouping ``( )``, literals ``"..."``, character classes ``[a-z]`` and ``[^...]``, ``.``
(any character), repetition ``* + ? {m} {m,} {m,n}``, comments ``# ...``, escapes ``\\n \\r \\t
\\\\ \\" \\[ \\] \\- \\xHH \\uHHHH \\UHHHHHHHH``; a rule ends at the end of its line except inside
parentheses or after ``|``; generation starts at ``root``. Repetitions are rewritten into helper
rules as llama.cpp does. A bad grammar is a ``HalfbyteError`` naming the line and column.

Matching is llama.cpp's pushdown automaton over Unicode code points: a state is the set of rule
stacks that the text so far leaves open (each stack's top is a character class still to match),
plus the bytes of a UTF-8 character a token left incomplete. Which tokens may come next is the
vocabulary walked byte by byte from the current state; the walk is vectorized over all tokens
(numpy, one step per byte position) with the transitions between states computed once and kept
(a lazily built automaton over bytes), and the mask of every state seen is cached, so a state met
again costs nothing. End-of-generation tokens are allowed only when the grammar accepts the text
(a stack is empty); tokens with no text (control tokens) never are.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import HalfbyteError

MAX_REPETITION = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
_END, _CHAR, _REF = 0, 1, 2
_DEAD = 0
_MASK_CACHE = 512  # masks kept per grammar and vocabulary
_MAX_STATES = 200_000  # past this the automaton starts over (memory bound)


class GrammarError(HalfbyteError):
    """A grammar that does not parse (the message names line:column)."""


# -- parsing ------------------------------------------------------------------------------------------


def _is_word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "-_")


class _Parser:
    def __init__(self, text: str) -> None:
        self.src = text
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self.rules: list[list[list[tuple]] | None] = []
        self.first_use: dict[int, int] = {}

    # positions
    def where(self, i: int) -> str:
        line = self.src.count("\n", 0, i) + 1
        col = i - (self.src.rfind("\n", 0, i) + 1) + 1
        return f"{line}:{col}"

    def fail(self, i: int, message: str) -> GrammarError:
        return GrammarError(f"grammar error at {self.where(i)}: {message}")

    def at(self, i: int) -> str:
        return self.src[i] if i < len(self.src) else ""

    def space(self, i: int, newline_ok: bool) -> int:
        src = self.src
        while i < len(src):
            c = src[i]
            if c in " \t" or (newline_ok and c in "\r\n"):
                i += 1
            elif c == "#":
                while i < len(src) and src[i] not in "\r\n":
                    i += 1
            else:
                break
        return i

    def symbol(self, name: str, i: int | None = None) -> int:
        if name not in self.ids:
            self.ids[name] = len(self.names)
            self.names.append(name)
            self.rules.append(None)
        rule_id = self.ids[name]
        if i is not None:
            self.first_use.setdefault(rule_id, i)
        return rule_id

    def new_symbol(self, base: str) -> int:
        n = len(self.names)
        while f"{base}_{n}" in self.ids:
            n += 1
        return self.symbol(f"{base}_{n}")

    def name_end(self, i: int) -> int:
        j = i
        while j < len(self.src) and _is_word(self.src[j]):
            j += 1
        if j == i:
            raise self.fail(i, f"expecting a rule name, got {self.at(i)!r}" if self.at(i) else "expecting a rule name")
        return j

    def char(self, i: int) -> tuple[int, int]:
        """One (possibly escaped) character at i: (code point, next index)."""
        src = self.src
        if i >= len(src):
            raise self.fail(i, "unexpected end of input")
        c = src[i]
        if c != "\\":
            return ord(c), i + 1
        e = self.at(i + 1)
        simple = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45}
        if e in simple:
            return simple[e], i + 2
        size = {"x": 2, "u": 4, "U": 8}.get(e)
        if size is None:
            raise self.fail(i, f"unknown escape \\{e}" if e else "unexpected end of input")
        digits = src[i + 2:i + 2 + size]
        if len(digits) != size or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise self.fail(i, f"expecting {size} hex digits after \\{e}")
        value = int(digits, 16)
        if value > 0x10FFFF:
            raise self.fail(i, f"\\{e}{digits} is beyond Unicode")
        return value, i + 2 + size

    def parse(self) -> None:
        i = self.space(0, True)
        if i >= len(self.src):
            raise self.fail(i, "empty grammar")
        while i < len(self.src):
            i = self.rule(i)
        for rule_id, rule in enumerate(self.rules):
            if rule is None:
                at = self.first_use.get(rule_id, 0)
                raise self.fail(at, f"undefined rule '{self.names[rule_id]}'")
        if "root" not in self.ids:
            raise GrammarError("grammar error: no 'root' rule (generation starts there)")

    def rule(self, i: int) -> int:
        end = self.name_end(i)
        name = self.src[i:end]
        rule_id = self.symbol(name)
        if self.rules[rule_id] is not None:
            raise self.fail(i, f"rule '{name}' is defined twice")
        j = self.space(end, False)
        if self.src[j:j + 3] != "::=":
            raise self.fail(j, "expecting ::=")
        j = self.space(j + 3, True)
        self.rules[rule_id] = []  # defined (a self-reference inside is fine)
        alternatives, j = self.alternates(j, name, False)
        self.rules[rule_id] = alternatives
        c = self.at(j)
        if c == "\r":
            j += 2 if self.at(j + 1) == "\n" else 1
        elif c == "\n":
            j += 1
        elif c:
            raise self.fail(j, f"expecting the end of the line, got {c!r}")
        return self.space(j, True)

    def alternates(self, i: int, name: str, nested: bool) -> tuple[list[list[tuple]], int]:
        alternatives = []
        seq, i = self.sequence(i, name, nested)
        alternatives.append(seq)
        while self.at(i) == "|":
            i = self.space(i + 1, True)
            seq, i = self.sequence(i, name, nested)
            alternatives.append(seq)
        return alternatives, i

    def sequence(self, i: int, name: str, nested: bool) -> tuple[list[tuple], int]:
        seq: list[tuple] = []
        last = None  # where the last symbol starts in seq
        while i < len(self.src):
            c = self.src[i]
            if c == '"':
                j = i + 1
                last = len(seq)
                while self.at(j) != '"':
                    if j >= len(self.src):
                        raise self.fail(i, "unterminated string literal")
                    cp, j = self.char(j)
                    seq.append((_CHAR, ((cp, cp),), False))
                i = self.space(j + 1, nested)
            elif c == "[":
                start, j = i, i + 1
                negated = self.at(j) == "^"
                if negated:
                    j += 1
                ranges = []
                while self.at(j) != "]":
                    if j >= len(self.src):
                        raise self.fail(start, "unterminated character class")
                    lo, j = self.char(j)
                    hi = lo
                    if self.at(j) == "-" and self.at(j + 1) not in ("]", ""):
                        hi, j = self.char(j + 1)
                        if hi < lo:
                            raise self.fail(start, "character range out of order")
                    ranges.append((lo, hi))
                last = len(seq)
                seq.append((_CHAR, tuple(ranges), negated))
                i = self.space(j + 1, nested)
            elif c == ".":
                last = len(seq)
                seq.append((_CHAR, ((0, 0x10FFFF),), False))
                i = self.space(i + 1, nested)
            elif c in "<!" and (c == "<" or self.at(i + 1) == "<"):
                raise self.fail(i, "token references (<...>) are not supported")
            elif _is_word(c):
                end = self.name_end(i)
                last = len(seq)
                seq.append((_REF, self.symbol(self.src[i:end], i)))
                i = self.space(end, nested)
            elif c == "(":
                sub = self.new_symbol(name)
                alternatives, j = self.alternates(self.space(i + 1, True), name, True)
                self.rules[sub] = alternatives
                if self.at(j) != ")":
                    raise self.fail(j, "expecting ')'" if j < len(self.src) else "unexpected end: expecting ')'")
                last = len(seq)
                seq.append((_REF, sub))
                i = self.space(j + 1, nested)
            elif c in "*+?{":
                if last is None:
                    raise self.fail(i, f"expecting something before {c!r} to repeat")
                if c == "{":
                    lo, hi, i = self.braces(i, nested)
                else:
                    lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                    i = self.space(i + 1, nested)
                self.repeat(seq, last, lo, hi, name)
            else:
                break
        return seq, i

    def braces(self, i: int, nested: bool) -> tuple[int, int | None, int]:
        start = i
        j = self.space(i + 1, nested)

        def integer(k: int) -> tuple[int, int]:
            m = k
            while self.at(m).isdigit() and self.at(m).isascii():
                m += 1
            if m == k:
                raise self.fail(k, "expecting an integer")
            return int(self.src[k:m]), m

        lo, j = integer(j)
        j = self.space(j, nested)
        hi: int | None = lo
        if self.at(j) == ",":
            j = self.space(j + 1, nested)
            hi = None
            if self.at(j).isdigit():
                hi, j = integer(j)
                j = self.space(j, nested)
        if self.at(j) != "}":
            raise self.fail(j, "expecting '}'")
        if lo > MAX_REPETITION:
            raise self.fail(start, f"{lo} repetitions is more than {MAX_REPETITION}")
        if hi is not None and hi > MAX_REPETITION:
            hi = None  # as llama.cpp: a huge maximum means no maximum
        if hi is not None and hi < lo:
            raise self.fail(start, f"repetition {{{lo},{hi}}}: the maximum is below the minimum")
        return lo, hi, self.space(j + 1, nested)

    def repeat(self, seq: list[tuple], last: int, lo: int, hi: int | None, name: str) -> None:
        """x{lo,hi} as llama.cpp rewrites it: lo copies of x, then hi-lo nested optional x's (or x*)."""
        prev = seq[last:]
        del seq[last:]
        for _ in range(lo):
            seq.extend(prev)
        if hi is None:
            rec = self.new_symbol(name)
            self.rules[rec] = [prev + [(_REF, rec)], []]
            seq.append((_REF, rec))
            return
        inner = None
        for _ in range(hi - lo):
            rec = self.new_symbol(name)
            self.rules[rec] = [prev + ([(_REF, inner)] if inner is not None else []), []]
            inner = rec
        if inner is not None:
            seq.append((_REF, inner))


class Grammar:
    """A parsed GBNF grammar. ``Grammar.from_string(text)``, ``from_file(path)``,
    ``from_json_schema(schema)`` (llama-cpp-python's ``LlamaGrammar`` names)."""

    def __init__(self, text: str, root: str = "root") -> None:
        if not isinstance(text, str):
            raise HalfbyteError(f"a grammar must be GBNF text (str), got {type(text).__name__}")
        parser = _Parser(text)
        parser.parse()
        self.text = text
        self.rule_names = parser.names
        if root not in parser.ids:
            raise GrammarError(f"grammar error: no {root!r} rule")
        rules: list[list[list[tuple]]] = parser.rules  # type: ignore[assignment]
        # Flatten: every element gets a position; each alternative ends with an END position.
        self.kind: list[int] = []
        self.value: list[Any] = []
        self.alts: list[list[int]] = []
        for alternatives in rules:
            starts = []
            for seq in alternatives:
                starts.append(len(self.kind))
                for element in seq:
                    self.kind.append(element[0])
                    self.value.append(element[1] if element[0] == _REF else (element[1], element[2]))
                self.kind.append(_END)
                self.value.append(None)
            self.alts.append(starts)
        self._check_left_recursion(rules)
        self.root = parser.ids[root]
        self._ascii: dict[int, np.ndarray] = {}
        self._matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @classmethod
    def from_string(cls, text: str, verbose: bool = False) -> Grammar:
        return _cached(text)

    @classmethod
    def from_file(cls, path: str) -> Grammar:
        from engine.run_cli import read_text_file

        return _cached(read_text_file(str(path)))

    @classmethod
    def from_json_schema(cls, schema: str | dict, verbose: bool = False) -> Grammar:
        from engine.json_schema import schema_to_gbnf

        return _cached(schema_to_gbnf(json.loads(schema) if isinstance(schema, str) else schema))

    def __repr__(self) -> str:
        return f"Grammar({len(self.rule_names)} rules)"

    def _check_left_recursion(self, rules: list[list[list[tuple]]]) -> None:
        nullable = [False] * len(rules)
        changed = True
        while changed:  # rules that can match the empty text
            changed = False
            for r, alternatives in enumerate(rules):
                if not nullable[r] and any(all(e[0] == _REF and nullable[e[1]] for e in seq) for seq in alternatives):
                    nullable[r] = changed = True
        # leftmost references (past nullable prefixes)
        left: list[set[int]] = []
        for alternatives in rules:
            refs = set()
            for seq in alternatives:
                for e in seq:
                    if e[0] != _REF:
                        break
                    refs.add(e[1])
                    if not nullable[e[1]]:
                        break
            left.append(refs)
        for r in range(len(rules)):
            seen, todo = set(), list(left[r])
            while todo:
                x = todo.pop()
                if x == r:
                    raise GrammarError(f"grammar error: rule '{self.rule_names[r]}' is left-recursive "
                                       "(llama.cpp refuses it too)")
                if x not in seen:
                    seen.add(x)
                    todo.extend(left[x])

    # -- the pushdown automaton ----------------------------------------------------------------

    def matches(self, pos: int, cp: int) -> bool:
        ranges, negated = self.value[pos]
        inside = False
        for lo, hi in ranges:
            if lo <= cp <= hi:
                inside = True
                break
        return inside != negated

    def could_match(self, pos: int, lo_cp: int, hi_cp: int) -> bool:
        """Some code point in [lo_cp, hi_cp] matches the class at pos (a partial UTF-8 character)."""
        ranges, negated = self.value[pos]
        if not negated:
            return any(lo <= hi_cp and hi >= lo_cp for lo, hi in ranges)
        return not any(lo <= lo_cp and hi >= hi_cp for lo, hi in ranges)

    def expand(self, stack: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The stacks ``stack`` stands for, each with a character class on top (or empty: done)."""
        out, todo, seen = [], [stack], set()
        kind, value, alts = self.kind, self.value, self.alts
        while todo:
            st = todo.pop()
            if st in seen:
                continue
            seen.add(st)
            if not st:
                out.append(st)
                continue
            pos = st[-1]
            k = kind[pos]
            if k == _CHAR:
                out.append(st)
            elif k == _END:
                todo.append(st[:-1])
            else:
                base = st[:-1]
                if kind[pos + 1] != _END:  # no frame for a reference that ends its alternative
                    base = base + (pos + 1,)
                for start in alts[value[pos]]:
                    todo.append(base + (start,))
        return out

    def initial_stacks(self) -> frozenset:
        stacks: set = set()
        for start in self.alts[self.root]:
            stacks.update(self.expand((start,)))
        return frozenset(stacks)

    def advance(self, stacks: frozenset, cp: int) -> frozenset:
        out: set = set()
        for st in stacks:
            if st and self.matches(st[-1], cp):
                out.update(self.expand(st[:-1] + (st[-1] + 1,)))
        return frozenset(out)

    def accepts_text(self, text: str) -> bool:
        """The whole of ``text`` is a sentence of the grammar."""
        stacks = self.initial_stacks()
        for ch in text:
            stacks = self.advance(stacks, ord(ch))
            if not stacks:
                return False
        return () in stacks

    def matcher(self, tokenizer: Any) -> GrammarMatcher:
        """A fresh matcher (the start of a text) for generation with ``tokenizer``'s vocabulary."""
        with self._lock:
            automaton = self._matchers.get(tokenizer)
            if automaton is None:
                automaton = _Automaton(self, _token_table(tokenizer))
                self._matchers[tokenizer] = automaton
        return GrammarMatcher(automaton)


# -- the vocabulary as bytes -----------------------------------------------------------------------------

class _TokenTable:
    def __init__(self, tokenizer: Any) -> None:
        pieces = [tokenizer.token_bytes(t) for t in range(tokenizer.vocab_size)]
        self.pieces = pieces
        self.lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        width = max(1, int(self.lengths.max()))
        self.bytes = np.zeros((len(pieces), width), dtype=np.uint8)
        for t, p in enumerate(pieces):
            if p:
                self.bytes[t, :len(p)] = np.frombuffer(p, dtype=np.uint8)
        self.eog = np.array(sorted(tokenizer.eog_ids), dtype=np.int64)
        self.eog_set = frozenset(int(t) for t in tokenizer.eog_ids)
        self.fallback = int(tokenizer.eos_id) if tokenizer.eos_id is not None else (
            int(self.eog[0]) if self.eog.size else 0)
        # walk order: longest first, so the tokens still walking at depth d are a prefix
        self.order = np.argsort(-self.lengths, kind="stable")
        self.sorted_lengths = self.lengths[self.order]
        self.sorted_bytes = self.bytes[self.order]
        self.first_bytes = np.ascontiguousarray(self.sorted_bytes[:, 0])
        self.plain = self.lengths > 0
        self.plain[self.eog] = False


_token_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def _token_table(tokenizer: Any) -> _TokenTable:
    with _tables_lock:
        table = _token_tables.get(tokenizer)
        if table is None:
            table = _token_tables[tokenizer] = _TokenTable(tokenizer)
        return table


def _utf8_length(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0  # a continuation byte or an invalid lead


def _partial_range(prefix: bytes, total: int) -> tuple[int, int]:
    """The code points whose UTF-8 starts with ``prefix`` (a sequence of ``total`` bytes)."""
    fill = total - len(prefix)
    lo = prefix + b"\x80" * fill
    hi = prefix + b"\xbf" * fill

    def value(b: bytes) -> int:
        v = b[0] & (0xFF >> (total + 1))
        for x in b[1:]:
            v = (v << 6) | (x & 0x3F)
        return v

    low, high = {2: (0x80, 0x7FF), 3: (0x800, 0xFFFF), 4: (0x10000, 0x10FFFF)}[total]  # no overlong forms
    return max(value(lo), low), min(value(hi), high)


class _Automaton:
    """The grammar's states over bytes (built as they are met) and the vocabulary masks."""

    def __init__(self, grammar: Grammar, table: _TokenTable) -> None:
        self.grammar = grammar
        self.table = table
        self.lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self.states: list[tuple[frozenset, bytes]] = [(frozenset(), b"")]  # 0: dead
        self.ids: dict[tuple[frozenset, bytes], int] = {self.states[0]: _DEAD}
        self.trans = np.full((1024, 256), -1, dtype=np.int32)
        self.trans[_DEAD] = _DEAD
        self.masks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.start = self._state(self.grammar.initial_stacks(), b"")

    def _state(self, stacks: frozenset, partial: bytes) -> int:
        if not stacks:
            return _DEAD
        key = (stacks, partial)
        sid = self.ids.get(key)
        if sid is None:
            sid = len(self.states)
            self.states.append(key)
            self.ids[key] = sid
            if sid >= self.trans.shape[0]:
                grown = np.full((self.trans.shape[0] * 2, 256), -1, dtype=np.int32)
                grown[: self.trans.shape[0]] = self.trans
                self.trans = grown
        return sid

    def complete(self, sid: int) -> bool:
        stacks, partial = self.states[sid]
        return not partial and () in stacks

    def _step(self, sid: int, b: int) -> int:
        stacks, partial = self.states[sid]
        g = self.grammar
        if not partial:
            n = _utf8_length(b)
            if n == 1:
                return self._state(g.advance(stacks, b), b"")
            if n == 0:
                return _DEAD
            prefix = bytes([b])
        else:
            if not 0x80 <= b <= 0xBF:
                return _DEAD
            prefix = partial + bytes([b])
            n = _utf8_length(prefix[0])
            if len(prefix) == n:
                try:
                    cp = ord(prefix.decode("utf-8"))
                except UnicodeDecodeError:
                    return _DEAD
                return self._state(g.advance(stacks, cp), b"")
        lo, hi = _partial_range(prefix, n)
        if lo > hi:
            return _DEAD
        alive = frozenset(st for st in stacks if st and g.could_match(st[-1], lo, hi))
        return self._state(alive, prefix)

    def _fill(self, sids: np.ndarray, bs: np.ndarray) -> None:
        keys = np.unique(sids.astype(np.int64) * 256 + bs)
        for key in keys.tolist():
            s, b = divmod(key, 256)
            if self.trans[s, b] < 0:
                target = self._step(s, b)
                self.trans[s, b] = target  # self.trans may have grown in _step: index after it

    def walk(self, sid: int, data: bytes) -> int:
        with self.lock:
            for b in data:
                nxt = int(self.trans[sid, b])
                if nxt < 0:
                    nxt = self._step(sid, b)
                    self.trans[sid, b] = nxt
                sid = nxt
                if sid == _DEAD:
                    break
            return sid

    def mask(self, sid: int) -> np.ndarray:
        """Which tokens may come next in state ``sid`` (bool per token id)."""
        with self.lock:
            cached = self.masks.get(sid)
            if cached is not None:
                self.masks.move_to_end(sid)
                return cached
            if len(self.states) > _MAX_STATES:
                key = self.states[sid]
                self._reset()
                sid = self._state(*key)
            t = self.table
            # depth 0: every token starts from sid, so one row of 256 transitions decides
            row = self.trans[sid]
            missing = np.nonzero(row < 0)[0]
            if missing.size:
                self._fill(np.full(missing.size, sid, dtype=np.int64), missing)
            cur = self.trans[sid][t.first_bytes]
            active = np.nonzero((cur != _DEAD) & (t.sorted_lengths > 1))[0]
            depth = 1
            while active.size:
                sids = cur[active]
                bs = t.sorted_bytes[active, depth]
                nxt = self.trans[sids, bs]
                unknown = nxt < 0
                if unknown.any():
                    self._fill(sids[unknown], bs[unknown])
                    nxt = self.trans[sids, bs]
                cur[active] = nxt
                depth += 1
                active = active[(nxt != _DEAD) & (t.sorted_lengths[active] > depth)]
            ok = np.zeros(len(t.order), dtype=bool)
            ok[t.order] = cur != _DEAD
            ok &= t.plain
            if t.eog.size:
                ok[t.eog] = self.complete(sid)
            self.masks[sid] = ok
            if len(self.masks) > _MASK_CACHE:
                self.masks.popitem(last=False)
            return ok


class GrammarMatcher:
    """Where one generation stands in the grammar: ``allows(token)``, ``mask_logits(logits)``,
    ``accept(token)``, ``is_complete``."""

    def __init__(self, automaton: _Automaton) -> None:
        self.automaton = automaton
        self.state = automaton.start

    @property
    def is_complete(self) -> bool:
        """The text so far is a whole sentence of the grammar (end of generation is allowed)."""
        return self.automaton.complete(self.state)

    def allows(self, token: int) -> bool:
        t = self.automaton.table
        if token in t.eog_set:
            return self.is_complete
        piece = t.pieces[token]
        return bool(piece) and self.automaton.walk(self.state, piece) != _DEAD

    def mask(self) -> np.ndarray:
        return self.automaton.mask(self.state)

    def mask_logits(self, logits: np.ndarray) -> np.ndarray:
        allowed = self.mask()
        out = np.array(logits, dtype=np.float32)
        out[~allowed[: out.shape[0]]] = -np.inf
        return out

    def accept(self, token: int) -> None:
        t = self.automaton.table
        if token in t.eog_set:
            return
        nxt = self.automaton.walk(self.state, t.pieces[token])
        if nxt == _DEAD:
            raise HalfbyteError(f"token {token} ({t.pieces[token]!r}) does not continue the grammar")
        self.state = nxt

    def fallback_token(self) -> int:
        """What to generate when the grammar allows no token at all: end of generation."""
        return self.automaton.table.fallback


# -- entry points ----------------------------------------------------------------------------------------

_grammar_cache: OrderedDict[str, Grammar] = OrderedDict()
_cache_lock = threading.Lock()


def _cached(text: str) -> Grammar:
    """Parsed grammars by text (a repeated grammar or schema reuses its warm automaton)."""
    if not isinstance(text, str):
        raise HalfbyteError(f"a grammar must be GBNF text (str), got {type(text).__name__}")
    with _cache_lock:
        grammar = _grammar_cache.get(text)
        if grammar is not None:
            _grammar_cache.move_to_end(text)
            return grammar
    grammar = Grammar(text)
    with _cache_lock:
        _grammar_cache[text] = grammar
        if len(_grammar_cache) > 32:
            _grammar_cache.popitem(last=False)
    return grammar


def as_grammar(grammar: Any) -> Grammar:
    """A ``Grammar`` from GBNF text or a ``Grammar`` (or anything with a GBNF ``_grammar`` text,
    like llama-cpp-python's ``LlamaGrammar``)."""
    if isinstance(grammar, Grammar):
        return grammar
    if isinstance(grammar, str):
        return _cached(grammar)
    text = getattr(grammar, "_grammar", None)
    if isinstance(text, str):
        return _cached(text)
    raise HalfbyteError(f"grammar must be GBNF text or an engine.grammar.Grammar, got {type(grammar).__name__}")


def _schema_of(value: Any, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise HalfbyteError(f"{what} is not valid JSON: {exc}") from None
    return value


def grammar_for_request(grammar: Any = None, response_format: Any = None, json_schema: Any = None) -> Grammar | None:
    """The grammar of a request: ``grammar`` (GBNF), llama.cpp's ``json_schema``, or OpenAI's
    ``response_format``: ``{"type": "json_object"}`` (any JSON object), ``{"type": "json_object",
    "schema": {...}}`` or ``{"type": "json_schema", "json_schema": {"schema": {...}}}``; ``{"type":
    "text"}`` is no constraint. At most one of them."""
    schema = None
    if response_format is not None:
        if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
            raise HalfbyteError('response_format must be {"type": "text" | "json_object" | "json_schema", ...}')
        kind = response_format["type"]
        if kind == "json_object":
            schema = response_format.get("schema", {"type": "object"})
            if schema is None:
                schema = {"type": "object"}
        elif kind == "json_schema":
            inner = response_format.get("json_schema")
            if not isinstance(inner, dict) or "schema" not in inner:
                raise HalfbyteError('response_format json_schema needs {"json_schema": {"schema": {...}}}')
            schema = inner["schema"]
        elif kind != "text":
            raise HalfbyteError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
    if json_schema is not None:
        if schema is not None:
            raise HalfbyteError("give either json_schema or response_format, not both")
        schema = json_schema
    if schema is not None and grammar is not None:
        raise HalfbyteError("give either a grammar or a JSON schema (response_format), not both")
    if grammar is not None:
        return as_grammar(grammar)
    if schema is None:
        return None
    from engine.json_schema import schema_to_gbnf

    return _cached(schema_to_gbnf(_schema_of(schema, "the JSON schema")))


def grammar_from_cli(grammar: str | None, grammar_file: str | None, json_schema: str | None,
                     json_schema_file: str | None) -> Grammar:
    """``--grammar``, ``--grammar-file``, ``-j`` or ``-jf`` (exactly one given) as a Grammar."""
    from engine.run_cli import read_text_file

    if grammar is not None:
        return _cached(grammar)
    if grammar_file is not None:
        text = read_text_file(grammar_file)
        try:
            return _cached(text)
        except GrammarError as exc:
            raise HalfbyteError(f"{grammar_file}: {exc}") from None
    from engine.json_schema import schema_to_gbnf

    source = json_schema if json_schema is not None else read_text_file(str(json_schema_file))
    what = "-j" if json_schema is not None else str(json_schema_file)
    return _cached(schema_to_gbnf(_schema_of(source, f"{what}: the JSON schema")))


def allowed_tokens(grammar: Grammar | str, tokenizer: Any, text: str = "") -> np.ndarray:
    """Token ids that may follow ``text`` under ``grammar`` (for tests and inspection)."""
    matcher = as_grammar(grammar).matcher(tokenizer)
    automaton = matcher.automaton
    matcher.state = automaton.walk(matcher.state, text.encode("utf-8"))
    if matcher.state == _DEAD:
        return np.zeros(0, dtype=np.int64)
    return np.nonzero(matcher.mask())[0]


__all__: Sequence[str] = ("Grammar", "GrammarError", "GrammarMatcher", "as_grammar", "grammar_for_request",
                          "grammar_from_cli", "allowed_tokens")
