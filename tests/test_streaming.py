"""Tokens -> streamed text with stop strings (streaming.TextStream), in stream_generate and `generate --stop`;
chat with a base model as a transcript (prompt.py), in ChatSession and `gemma3 chat` on the default model."""

import random

import pytest

import gemma3_mlx
from gemma3_mlx.prompt import PREAMBLE, TRANSCRIPT_STOP, transcript_ids
from gemma3_mlx.streaming import TextStream
from gemma3_mlx.tokenizer import Tokenizer
from test_cli import run


class Pieces:
    """A stand-in tokenizer: token i is the bytes pieces[i] (for StreamingDetokenizer)."""

    def __init__(self, pieces):
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces]

    def token_bytes(self, i, skip_special=True):
        return self.pieces[i]


def stream(pieces, stop, strip=False):
    """(the pieces emitted after each token, the closing piece, the TextStream)."""
    ts = TextStream(Pieces(pieces), stop, strip)
    outs = [ts.add(i) for i in range(len(pieces))]
    return outs, ts.finish(), ts


def longest_stop_prefix(text, stops):
    return max([k for k in range(1, len(text) + 1) for s in stops if s.startswith(text[-k:])], default=0)


def test_stop_strings_cut_anywhere_and_hold_back_only_what_could_start_one():
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("ab\n:U") for _ in range(rng.randrange(1, 30)))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 10))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        stops = [rng.choice(["U:", "\nU", "ab:", "b", "::a"]) for _ in range(rng.randrange(1, 3))]
        outs, last, ts = stream(pieces, stops)
        hits = [text.find(s) for s in stops if s in text]
        want = text[: min(hits)] if hits else text
        assert "".join(outs) + last == want and ts.stopped == bool(hits), (pieces, stops)
        # Before the stop, what is out after each token is the text so far less the longest end that
        # some stop string starts with (worked out here by brute force).
        seen, so_far = "", ""
        for piece, out in zip(pieces, outs):
            so_far += piece
            seen += out
            if hits and len(so_far) >= min(hits) + 1:
                break
            assert seen == so_far[: len(so_far) - longest_stop_prefix(so_far, stops)], (pieces, stops)
        # The tokens kept are those whose text lies wholly before the stop.
        ends = [sum(map(len, pieces[: i + 1])) for i in range(len(pieces))]
        assert len(ts.kept) == sum(e <= len(want) for e in ends)


def test_characters_split_over_tokens_and_strip():
    snake = "🐍".encode()
    outs, last, _ = stream([snake[:2], snake[2:], " ok"], ["k"])
    assert outs == ["", "🐍", " o"] and last == ""
    outs, last, ts = stream([" The", " answer", ".", "\n", "\n", "User", ":"], [TRANSCRIPT_STOP], strip=True)
    assert "".join(outs) + last == "The answer." and ts.kept == [0, 1, 2, 3, 4]
    outs, last, _ = stream(["  a", "\n\n", "b ", " "], [], strip=True)
    assert outs == ["a", "", "\n\nb", ""] and last == ""


def test_stream_generate_stops_at_a_stop_string(default_model):
    model, tok = default_model
    prompt = "The capital of France is"
    free = list(gemma3_mlx.stream_generate(model, tok, prompt, max_tokens=20))
    whole = "".join(r.text for r in free)
    assert whole.count(".") >= 2  # " the capital of the country of France. It is ..."
    cut = list(gemma3_mlx.stream_generate(model, tok, prompt, max_tokens=20, stop=[". It"]))
    assert "".join(r.text for r in cut) == whole[: whole.index(". It")]
    assert cut[-1].finish_reason == "stop" and cut[-1].token is None
    ids = [r.token for r in free if r.token is not None]
    assert cut[-1].kept_tokens == max(n for n in range(len(ids) + 1) if len(tok.decode(ids[:n])) <= whole.index(". It"))
    assert len(cut) <= cut[-1].kept_tokens + 3  # the engine stopped at the stop string, not at max_tokens


def test_transcript_ids_are_the_transcript_text(tokenizer_270m):
    tok = Tokenizer(tokenizer_270m)  # the default model's tokenizer.model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <start_of_turn>"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}]
    text = f"{PREAMBLE}\nBe brief.\n\nUser: Hi <start_of_turn>\nAssistant: Hello.\nUser: And?\nAssistant:"
    ids = transcript_ids(tok, messages)
    assert ids[0] == tok.bos_id and tok.decode(ids) == text
    assert tok.start_of_turn_id not in ids  # typed text stays text
    with pytest.raises(ValueError, match="alternate"):
        transcript_ids(tok, messages[:3] + messages[2:3])


def test_base_model_chat_answers_in_a_transcript(gemma3_home):
    # The acceptance: the default (base) model answers, and does not repeat the question.
    r = run(["chat", "--temp", "0", "-n", "24"], home=gemma3_home,
            input="What is the capital of France?\nAnd of Italy?\n")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()
    assert "Paris" in first and "Rome" in second and "Paris" not in second
    assert "capital of France?" not in r.stdout and "Italy?" not in r.stdout and "User" not in r.stdout
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "base model" in warnings[0] and "gemma-3-270m-it" in warnings[0]
    assert len(warnings[0]) < 120  # shorter than it was (150 characters)


def test_base_model_chat_session_reuses_its_cache(default_model):
    model, tok = default_model
    chat = gemma3_mlx.ChatSession(model, tok, max_tokens=24)
    assert chat.transcript
    first = "".join(r.text for r in chat.send("What is the capital of France?"))
    n1, reply = chat.last.prompt_tokens, chat.messages[-1]
    assert first == "The capital of France is Paris." and chat.last.finish_reason == "stop"
    assert tok.decode(reply["ids"]).strip() == first  # the reply as generated, up to the stop string
    "".join(r.text for r in chat.send("And of Italy?"))
    # Only the new line runs: the reply's tokens (and the cache) are reused as generated.
    # (the "User:" the model went on to write is in the cache too, and so reused)
    assert chat.last.prefill_tokens <= chat.last.prompt_tokens - n1 - len(reply["ids"]) < 12


def test_generate_stop_flag_and_help_types(gemma3_home):
    whole = run(["generate", "--raw", "The capital of France is", "-n", "20"], home=gemma3_home).stdout
    r = run(["generate", "--raw", "The capital of France is", "-n", "20", "--stop", ". It", "--stop", "zzz"],
            home=gemma3_home)
    assert r.returncode == 0, r.stderr
    assert r.stdout == whole[: whole.index(". It")] + "\n"
    for command in ("generate", "chat", "serve"):
        text = run([command, "--help"]).stdout
        assert "LIST" not in text and "list[" not in text.lower() and "PATH" in text or command == "serve"
    assert "--stop TEXT" in run(["generate", "--help"]).stdout
