"""Tokenizer rebuilt from the 270M GGUF against the recorded Hugging Face reference (tokenizer_cases.json)."""

import json
from pathlib import Path

import gguf
import pytest

import gemma3_mlx
import sentencepiece as spm

from gemma3_mlx.convert.gguf_file import GGUFFile
from gemma3_mlx.convert.gguf_tokenizer import sentencepiece_model_from_gguf
from gemma3_mlx.tokenizer import StreamingDetokenizer, Tokenizer

CASES = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_cases.json").read_text(encoding="utf-8"))
STRINGS = CASES["strings"]
CONVERSATIONS = CASES["conversations"]
STRING_IDS = [f"s{i}" for i in range(len(STRINGS))]
CONVERSATION_IDS = [f"c{i}" for i in range(len(CONVERSATIONS))]


@pytest.fixture(scope="session")
def tokenizer_model(gguf_270m, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(sentencepiece_model_from_gguf(GGUFFile(gguf_270m)))
    return path


@pytest.fixture(scope="session")
def tok(tokenizer_model) -> Tokenizer:
    return Tokenizer(tokenizer_model)


def expected_ids(case: dict) -> list[int]:
    # Where HF's GGUF tokenizer and llama.cpp disagree (space runs longer than the longest
    # whitespace piece), SentencePiece semantics, i.e. llama.cpp's, are the ones we keep.
    return case.get("llama_cpp_ids", case["ids"])


def is_ordinary(tok: Tokenizer, ids: list[int]) -> bool:
    return not any(i in tok.special_ids for i in ids)


# --- GGUF -> tokenizer.model -------------------------------------------------------------------


def test_model_settings(tokenizer_model):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert sp.get_piece_size() == 262144
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.is_unknown(3) and sp.id_to_piece(3) == "<unk>"  # typed control in the GGUF
    assert sp.is_control(105) and sp.is_control(106)
    assert sp.id_to_piece(138) == "\u2581\u2581"  # user-defined "  " respelled with U+2581
    assert sp.encode("Hello") == [9259]  # no dummy prefix
    assert sp.encode("a  b") == [236746, 138, 236763]  # whitespace kept, not collapsed
    assert sp.encode("123") == [236770, 236778, 236800]  # digits split
    assert sp.encode("\n\n") == [108] and sp.encode("<start_of_image>") == [255999]
    assert sp.encode("\x00") == [238]  # byte fallback <0x00>


def write_gguf(path, arch: str, tokenizer_model: str | None):
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    if tokenizer_model is not None:
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_token_list(["<pad>", "<eos>", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


def test_gguf_without_tokenizer_raises(tmp_path):
    reader = write_gguf(tmp_path / "bare.gguf", "gemma3", None)
    with pytest.raises(ValueError, match="no tokenizer metadata"):
        sentencepiece_model_from_gguf(reader)


def test_gguf_with_bpe_tokenizer_raises(tmp_path):
    reader = write_gguf(tmp_path / "gpt2.gguf", "gpt2", "gpt2")
    with pytest.raises(ValueError, match="not a SentencePiece"):
        sentencepiece_model_from_gguf(reader)


# --- Encoding ------------------------------------------------------------------------------------


def test_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)
    assert {tok.eos_id, tok.end_of_turn_id} == set(gemma3_mlx.STOP_IDS)  # what ends a reply, owned by the engine
    assert tok.vocab_size == 262144


def test_from_bytes_matches_path(tok, tokenizer_model):
    other = Tokenizer.from_bytes(tokenizer_model.read_bytes(), boi_token_index=255999)
    assert other.encode("Hi <start_of_turn> there") == tok.encode("Hi <start_of_turn> there")
    assert other.boi_token_index == 255999


def test_divergences_from_hf_are_only_long_space_runs():
    for case in STRINGS:
        if "llama_cpp_ids" in case:
            assert " " * 32 in case["text"], case["text"]


@pytest.mark.parametrize("case", STRINGS, ids=STRING_IDS)
def test_encode_matches_reference(tok, case):
    assert tok.encode(case["text"], add_bos=False) == expected_ids(case)


@pytest.mark.parametrize("case", STRINGS, ids=STRING_IDS)
def test_encode_adds_bos_once(tok, case):
    ids = expected_ids(case)
    assert tok.encode(case["text"]) == (ids if ids[:1] == [2] else [2, *ids])


def test_bos_never_doubled(tok):
    assert tok.encode("<bos>Hello") == [2, 9259]
    assert tok.encode("") == [2]
    assert tok.encode("", add_bos=False) == []


def test_split_on_special_strings(tok):
    assert tok.encode("a<start_of_turn>b<end_of_turn>", add_bos=False) == [236746, 105, 236763, 106]
    assert tok.encode("<start_of_turn", add_bos=False)[0] != 105  # incomplete: plain text
    assert tok.encode("<unused0><mask><unk><pad><eos>", add_bos=False) == [6, 4, 3, 0, 1]


@pytest.mark.parametrize("case", STRINGS, ids=STRING_IDS)
def test_decode_roundtrip(tok, tokenizer_model, case):
    text, ids = case["text"], tok.encode(case["text"], add_bos=False)
    assert tok.decode(ids, skip_special=False) == text
    if is_ordinary(tok, ids):
        assert tok.decode([2, *ids]) == text  # BOS decodes to nothing
        assert tok.decode(ids) == spm.SentencePieceProcessor(model_file=str(tokenizer_model)).decode(ids)


def test_decode_skips_specials(tok):
    assert tok.decode([2, 105, 2364, 107, 9259, 106, 1]) == "user\nHello"
    assert tok.decode([2, 105, 2364], skip_special=False) == "<bos><start_of_turn>user"
    assert tok.decode([262144, 9259]) == "Hello"  # image soft token lies past the vocabulary


# --- Chat template -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONVERSATIONS, ids=CONVERSATION_IDS)
def test_chat_template_matches_reference(tok, case):
    ids = tok.apply_chat_template(case["messages"], add_generation_prompt=True)
    assert ids == case["ids"]
    # One BOS from the template; the reference maps "<bos>" written in message text to id 2 too.
    written = sum(m["content"].count("<bos>") for m in case["messages"])
    assert ids[:2] == [2, 105] and ids.count(2) == 1 + written
    assert ids[-3:] == [105, 4368, 107]  # <start_of_turn>model\n


def test_chat_template_without_generation_prompt(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert ids[-2:] == [106, 107]
    assert ids + [105, 4368, 107] == tok.apply_chat_template(messages)
    model_alias = [messages[0], {"role": "model", "content": "Hello"}]
    assert tok.apply_chat_template(model_alias, add_generation_prompt=False) == ids


@pytest.mark.parametrize(
    "roles",
    [
        ["user", "user"],
        ["assistant"],
        ["model", "user"],
        ["user", "model", "model"],
        ["system", "system", "user"],
        ["user", "system"],
        ["user", "model", "system", "user"],
        ["system"],
        [],
        ["user", "tool"],
    ],
)
def test_chat_template_bad_roles_raise(tok, roles):
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": r, "content": "x"} for r in roles])


def test_chat_turn_ids_extend_a_conversation(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "Bye\n"},
    ]
    prefix = tok.apply_chat_template(messages[:2], add_generation_prompt=False)
    reply = tok.chat_turn_ids("assistant", messages[2]["content"])
    question = tok.chat_turn_ids("user", messages[3]["content"], add_generation_prompt=True)
    assert 2 not in reply and 2 not in question
    assert tok.encode("Be brief.", add_bos=False)[0] not in question  # no system text
    assert prefix + reply + question == tok.apply_chat_template(messages)
    with pytest.raises(ValueError):
        tok.chat_turn_ids("system", "x")


# --- Streaming detokenizer -----------------------------------------------------------------------


def stream(tok, ids, skip_special=True) -> list[str]:
    detok = StreamingDetokenizer(tok, skip_special)
    return [detok.add(i) for i in ids] + [detok.finalize()]


def check_stream(tok, ids, skip_special=True):
    full = tok.decode(ids, skip_special)
    chunks = stream(tok, ids, skip_special)
    assert "".join(chunks) == full
    emitted = ""
    for chunk in chunks:
        chunk.encode("utf-8")  # no lone surrogates: every emitted piece is valid text
        emitted += chunk
        assert full.startswith(emitted)
    if "\ufffd" not in full:
        assert all("\ufffd" not in chunk for chunk in chunks)


@pytest.mark.parametrize("case", STRINGS, ids=STRING_IDS)
def test_stream_matches_decode(tok, case):
    ids = tok.encode(case["text"])
    check_stream(tok, ids)
    check_stream(tok, ids, skip_special=False)


@pytest.mark.parametrize("case", CONVERSATIONS, ids=CONVERSATION_IDS)
def test_stream_matches_decode_chat(tok, case):
    check_stream(tok, case["ids"])


def byte_ids(text: str) -> list[int]:
    return [238 + b for b in text.encode("utf-8")]  # <0x00> is id 238


def test_stream_waits_for_whole_characters(tok):
    ids = byte_ids("😀") + [9259] + byte_ids("日") + [105] + byte_ids("€")
    chunks = stream(tok, ids)
    assert chunks == ["", "", "", "😀", "Hello", "", "", "日", "", "", "", "€", ""]
    assert "".join(chunks) == tok.decode(ids) == "😀Hello日€"


def test_stream_byte_fallback_for_every_string(tok):
    # Spell each reference string as raw byte ids, interleaved with a control token mid-character.
    for case in STRINGS:
        ids = byte_ids(case["text"])
        check_stream(tok, ids)
        check_stream(tok, [i for b in ids for i in (b, 106)])
        check_stream(tok, [i for b in ids for i in (b, 106)], skip_special=False)


def test_stream_invalid_utf8_matches_decode(tok):
    for ids in ([238 + 0xE2, 9259], [238 + 0xE2, 238 + 0x82], [238 + 0xFF, 238 + 0xF0, 238 + 0x9F, 9259]):
        check_stream(tok, ids)
    assert "".join(stream(tok, [238 + 0xE2, 238 + 0x82])) == "\ufffd"


def test_stream_reusable_after_finalize(tok):
    detok = StreamingDetokenizer(tok)
    assert detok.add(238 + 0xE2) == "" and detok.finalize() == "\ufffd"
    assert "".join(detok.add(i) for i in tok.encode("日本 😀")) + detok.finalize() == "日本 😀"
