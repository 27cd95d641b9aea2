"""Sampling settings: the one object that says how a reply is drawn, with its defaults in one place.

`Sampling` is frozen: front ends (the API, the CLI, chat, the server, the Ollama routes) build one
from what the user gave and hand it to the engine; changes make a new one (`s.replace(temp=0.7)`).
It holds the draw (temperature, top-k/p, min-p, repetition penalty, seed), the limits (max_tokens,
stop strings) and the output constraint (constrain.py). It validates itself when made, so a bad
value is one ValueError naming the setting, wherever it came from. It does no sampling itself:
`sampler()` makes the `sample.Sampler` that does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace as _replace

from .constrain import Constraint
from .sample import Sampler, validate

MAX_STOP_STRINGS = 16  # as OpenAI's limit is 4 and Ollama's is unbounded: enough for both, bounded
MAX_STOP_CHARS = 512
MAX_REPETITION_CONTEXT = 1 << 20  # tokens a repetition penalty looks back over: past any context Gemma 3 has


@dataclass(frozen=True)
class Sampling:
    temp: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    repetition_context: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None  # None: MLX's global random stream
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings: the reply ends before the first one (not included)
    constraint: Constraint | None = None  # what the reply must match (JSON schema, regex, grammar)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        validate(self.temp, self.top_k, self.top_p, self.min_p, self.repetition_penalty)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1 (got {self.max_tokens!r})")
        if isinstance(self.repetition_context, bool) or not isinstance(self.repetition_context, int) \
                or not 1 <= self.repetition_context <= MAX_REPETITION_CONTEXT:
            raise ValueError(f"repetition_context must be an integer from 1 to {MAX_REPETITION_CONTEXT} "
                             f"(got {self.repetition_context!r})")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer from 0 to 2**64 - 1 (got {self.seed!r})")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings (got {len(self.stop)})")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string must be non-empty text of at most {MAX_STOP_CHARS} characters "
                                 f"(got {s!r:.40})")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError("constraint must be a gemma3_mlx.Constraint (Constraint.json_schema(...), ...)")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, **changes) -> "Sampling":
        """A copy with some settings changed (unknown names are a ValueError naming the known ones)."""
        unknown = set(changes) - set(self.names())
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))} (known: {', '.join(self.names())})")
        return _replace(self, **changes)

    @property
    def greedy(self) -> bool:
        """Temperature 0 and no penalty: a plain argmax (a retried reply is the same reply)."""
        return self.temp == 0 and self.repetition_penalty == 1.0

    def draw(self) -> tuple:
        """What the sampler is made from: two settings with equal draws sample alike."""
        return (self.temp, self.top_k, self.top_p, self.min_p, self.repetition_penalty, self.repetition_context)

    def to_json(self) -> dict:
        """As JSON (the constraint by kind and source): a request sent to other ranks."""
        d = {f: getattr(self, f) for f in self.names() if f != "constraint"}
        d["stop"] = list(self.stop)
        c = self.constraint
        d["constraint"] = None if c is None else {"kind": c.kind, "source": c.source}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Sampling":
        c = d.get("constraint")
        return cls(**{**d, "stop": tuple(d.get("stop", ())),
                      "constraint": None if c is None else Constraint(c["kind"], c["source"])})

    def sampler(self) -> Sampler:
        """A fresh `Sampler` (its own random stream, from `seed`)."""
        return Sampler(self.temp, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                       self.repetition_context, self.seed)


DEFAULT = Sampling()


def make_sampler(temp: float | None = None, **settings) -> Sampler:
    """A `Sampler` (`sample(logits (B, V), history) -> token ids (B,)`) from settings by name
    (`make_sampler(0.7, top_p=0.95, seed=1)`); the rest are Sampling's defaults. Temperature 0 is
    greedy. Kept across calls, it keeps one random stream."""
    if temp is not None:
        settings["temp"] = temp
    return Sampling(**settings).sampler()
