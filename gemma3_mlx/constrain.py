"""Output constraints: JSON Schema, any JSON object, a regular expression or a grammar, on llguidance.

A `Constraint` says what a reply must match; it is part of the sampling settings (settings.py).
The engine turns it into one llguidance matcher per sequence (`matcher()`), advances the matcher
with each token read back, fills a bitmask of the allowed next tokens on the host while the device
runs the next forward pass, and applies it with plain MLX (`allowed()`), so it runs alike on the
CPU, CUDA and Metal. This module does not sample and does not drive the loop (engine.py does).

The tokenizer bridge (`vocabulary()`) is built once per tokenizer and logits width (about 1 s for
262,144 pieces): '▁' is a space, `<0xHH>` pieces their byte, control tokens are special, and the
table is padded to the logits width (262,208 for the 4B-27B).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import cached_property

import llguidance
import mlx.core as mx
import numpy as np

MAX_SOURCE_CHARS = 1 << 20  # a schema, regex or grammar larger than 1 MB is refused before compiling
EOS_ID = 1
MAX_FORCED = 4096  # forced bytes from the start beyond which a constraint is taken as endless
# Reply-side JSON: compact separators, no free whitespace (a small model given free whitespace can
# pad forever); the schema's own "x-guidance" options may override.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LIMITS = dict(step_lexer_fuel=2_000_000, max_items_in_row=5_000, initial_lexer_fuel=2_000_000,
               step_max_items=100_000, max_lexer_states=250_000, max_grammar_size=2_000_000)


class ConstraintError(ValueError):
    """A constraint that cannot be compiled (bad syntax, an unsupported keyword, an unsatisfiable
    schema, too large): the message says why."""


def _limits():
    limits = llguidance.LLParserLimits(**_LIMITS)
    return limits


@dataclass(frozen=True)
class Constraint:
    """What a reply must match. Make one with `json_schema`, `json_object`, `regex`, `lark` or `gbnf`."""

    kind: str  # "json_schema", "json_object", "regex", "lark"
    source: str  # the schema as JSON text, the regex, or the Lark grammar

    @classmethod
    def json_schema(cls, schema) -> "Constraint":
        """A JSON Schema, as a dict or JSON text."""
        if isinstance(schema, (dict, bool)):
            text = json.dumps(schema)
        elif isinstance(schema, str):
            text = schema
        else:
            raise ConstraintError(f"a JSON schema must be an object (got {type(schema).__name__})")
        _check_size("JSON schema", text)
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ConstraintError(f"the JSON schema is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(parsed, (dict, bool)):
            raise ConstraintError(f"a JSON schema must be an object (got {type(parsed).__name__})")
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> "Constraint":
        """Any JSON object."""
        return cls("json_schema", '{"type": "object"}')

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        _check_size("regular expression", pattern)
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> "Constraint":
        """A Lark grammar (llguidance's dialect: `start: ...`, terminals, /regexes/, %json)."""
        _check_size("grammar", grammar)
        return cls("lark", grammar)

    @classmethod
    def gbnf(cls, grammar: str) -> "Constraint":
        """A llama.cpp GBNF grammar (`root ::= ...`), converted to Lark by llguidance."""
        _check_size("grammar", grammar)
        try:
            return cls("lark", llguidance.gbnf_to_lark.gbnf_to_lark(grammar))
        except Exception as e:  # the converter raises plain exceptions on syntax errors
            raise ConstraintError(f"the GBNF grammar does not parse: {str(e)[:300]}") from None

    @classmethod
    def grammar(cls, text: str) -> "Constraint":
        """A grammar file's text: GBNF when it defines `root ::=`, else Lark."""
        return cls.gbnf(text) if "::=" in text else cls.lark(text)

    @cached_property
    def compiled(self) -> str:
        """The llguidance grammar (checked for syntax without a tokenizer)."""
        try:
            if self.kind == "json_schema":
                g = llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
            elif self.kind == "regex":
                g = llguidance.LLMatcher.grammar_from_regex(self.source)
            elif self.kind == "lark":
                g = llguidance.LLMatcher.grammar_from_lark(self.source)
            else:
                raise ConstraintError(f"unknown constraint kind {self.kind!r}")
        except ValueError as e:
            raise ConstraintError(_reason(str(e))) from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(g, limits=_limits())
        if failed:
            raise ConstraintError(_reason(messages[0]))
        return g

    def describe(self) -> str:
        return {"json_schema": "JSON schema", "regex": "regular expression", "lark": "grammar"}[self.kind]

    def matcher(self, vocab: "Vocabulary") -> "llguidance.LLMatcher":
        """A fresh matcher for one sequence; ConstraintError if the constraint cannot be compiled."""
        m = llguidance.LLMatcher(vocab.lltok, self.compiled, log_level=0, limits=_limits())
        if m.is_error():
            raise ConstraintError(_reason(m.get_error()))
        if m.is_stopped() and not m.is_accepting():
            raise ConstraintError(f"the {self.describe()} matches nothing")
        return m

    def check(self, vocab: "Vocabulary") -> None:
        """Raise ConstraintError now (e.g. before a request is queued) if this cannot run, or if it
        can never end: what it forces from the start runs past MAX_FORCED bytes (a `$ref` cycle, a
        rule that only recurses). A grammar whose endlessness is a choice is not caught here; its
        reply still ends at max_tokens."""
        m = self.matcher(vocab)
        if not m.is_accepting() and np.count_nonzero(vocab.fill([(m, 0)], 1)[0] & ~np.int32(1 << EOS_ID)) == 0:
            raise ConstraintError(f"the {self.describe()} matches nothing (a $ref cycle, or a rule with no way out)")
        forced = m.compute_ff_bytes()
        if len(forced) >= MAX_FORCED:
            raise ConstraintError(f"the {self.describe()} can never end: it forces an endless "
                                  f"{forced[:24].decode('utf-8', 'replace')!r}...")


def _check_size(what: str, text: str) -> None:
    if not isinstance(text, str):
        raise ConstraintError(f"a {what} must be text (got {type(text).__name__})")
    if len(text) > MAX_SOURCE_CHARS:
        raise ConstraintError(f"the {what} is {len(text):,} characters; at most {MAX_SOURCE_CHARS:,} are accepted")


def _reason(message: str) -> str:
    """llguidance's message, on one line and bounded."""
    line = " ".join(message.split())
    return line if len(line) <= 300 else line[:297] + "..."


class _Pieces:
    """What llguidance.TokenizerWrapper reads: each id's bytes, special ids, eos, and encoding."""

    def __init__(self, tokenizer, width: int):
        n = tokenizer.vocab_size
        self.eos_token_id, self.bos_token_id = EOS_ID, tokenizer.bos_id
        special = set(tokenizer.special_ids)
        self.tokens = [b"\xff" + tokenizer._sp.id_to_piece(i).encode("utf-8") if i in special
                       else tokenizer.token_bytes(i) for i in range(n)]
        self.tokens += [b""] * (width - n)  # ids past the tokenizer (the image soft token, padding): never allowed
        self.special_token_ids = sorted(special)
        self._sp = tokenizer._sp

    def __call__(self, data: bytes) -> list[int]:
        return self._sp.encode(data.decode("utf-8", errors="replace"))  # no BOS, no dummy prefix (Gemma's SP)


class Vocabulary:
    """The tokenizer as llguidance sees it, for one logits width, and a mask buffer."""

    def __init__(self, tokenizer, width: int):
        self.width = width
        self.lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Pieces(tokenizer, width)))
        self.words = (width + 31) // 32
        self.executor = llguidance.LLExecutor()

    def fill(self, matchers: list[tuple[object, int]], rows: int) -> np.ndarray:
        """(rows, words) int32 bitmask: row i's allowed next tokens for each (matcher, i), all allowed
        for rows without one. Several matchers fill in parallel, the GIL released."""
        mask = np.full((rows, self.words), -1, dtype=np.int32)
        if len(matchers) == 1:
            m, i = matchers[0]
            row = mask[i]
            m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        elif matchers:
            self.executor.unsafe_compute_mask_ptr(matchers, mask.ctypes.data, self.words * 4, rows)
        return mask


_lock = threading.Lock()


def vocabulary(tokenizer, width: int) -> Vocabulary:
    """The tokenizer's bridge for this logits width, built once and kept on the tokenizer."""
    with _lock:
        cache = tokenizer.__dict__.setdefault("_constraint_vocabularies", {})
        if width not in cache:
            cache[width] = Vocabulary(tokenizer, width)
        return cache[width]


_SHIFTS = None


def allowed(mask: np.ndarray, width: int) -> mx.array:
    """A host bitmask (B, words) -> (B, width) booleans on the device, in plain MLX."""
    global _SHIFTS
    if _SHIFTS is None:
        _SHIFTS = mx.arange(32, dtype=mx.uint32)
    bits = mx.array(mask.view(np.uint32))[:, :, None] >> _SHIFTS
    return (bits & 1).astype(mx.bool_).reshape(mask.shape[0], -1)[:, :width]


def masked(logits: mx.array, allowed: mx.array | None) -> mx.array:
    """Refused tokens at -inf (before temperature and the filters: see sample.py for the order)."""
    return logits if allowed is None else mx.where(allowed, logits, mx.array(float("-inf"), logits.dtype))


def allows(mask_row: np.ndarray, token: int) -> bool:
    """Whether a host bitmask row allows `token`."""
    return bool((int(mask_row[token >> 5]) >> (token & 31)) & 1)
