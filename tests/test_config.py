"""Config parsing: both transformers schemas, multimodal defaults, layer kinds, refusals."""

import json

import pytest

from conftest import FIXTURES
from gemma3_mlx.config import GLOBAL, LOCAL, ModelConfig, instruction_tuned_from_name
from gemma3_mlx.errors import ConfigError


def load(name):
    return ModelConfig.from_dict(json.loads((FIXTURES / name / "config.json").read_text()))


def test_transformers5_schema():
    c = load("tiny_v5").text
    assert [i for i, local in enumerate(c.is_local) if not local] == [3, 7]
    assert (c.rope_local.rope_theta, c.rope_local.factor) == (10000.0, 1.0)
    assert (c.rope_global.rope_theta, c.rope_global.factor) == (1e6, 8.0)
    assert c.query_pre_attn_scalar == 24 and c.head_dim == 32 and c.sliding_window == 6


def test_transformers4_schema():
    c = load("tiny_v4").text
    assert c.layer_types == (LOCAL,) * 5 + (GLOBAL, LOCAL)  # (i + 1) % 6 == 0 is global
    assert (c.rope_global.rope_theta, c.rope_global.factor) == (1e6, 8.0)
    assert c.rope_local.factor == 1.0  # rope_scaling applies to global layers only


def test_round_trip_through_to_dict():
    for name in ("tiny_v4", "tiny_v5"):
        c = load(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_multimodal_config_fills_text_defaults():
    # The real 4B config leaves out head counts and other text fields.
    d = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "patch_size": 14},
        "mm_tokens_per_image": 256,
        "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "image_token_index": 262144,
    }
    c = ModelConfig.from_dict(d)
    t = c.text
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.vocab_size) == (8, 4, 256, 262208)
    assert t.query_pre_attn_scalar == 256 and t.rope_global.factor == 8.0 and t.rope_local.rope_theta == 10000.0
    assert sum(not x for x in t.is_local) == 5 and c.vision.patch_size == 14 and c.image_token_index == 262144


def test_27b_style_scalar_and_soft_capping_ignored():
    c = ModelConfig.from_dict({"model_type": "gemma3_text", "hidden_size": 5376, "num_attention_heads": 32,
                               "head_dim": 128, "query_pre_attn_scalar": 168, "num_hidden_layers": 62,
                               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0})
    assert c.text.query_pre_attn_scalar == 168 and c.text.head_dim == 128
    assert "final_logit_softcapping" not in c.to_dict()


@pytest.mark.parametrize("d", [
    {"model_type": "llama", "hidden_size": 4096},
    {"architectures": ["LlamaForCausalLM"]},
    {"model_type": "gemma3_text", "layer_types": ["full_attention"], "num_hidden_layers": 2},
    {"model_type": "gemma3_text", "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4}}},
    [1, 2],
])
def test_bad_configs_are_refused(d):
    with pytest.raises(ConfigError):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("name, tuned", [
    ("google/gemma-3-270m-it", True), ("gemma-3-270m-it-q8", True), ("gemma-3-1b-it-GGUF", True),
    ("Gemma 3 270m It", True), ("gemma-3-4b-pt", False), ("google/gemma-3-270m", False), ("gemma-3-270m", False),
    ("my-instruct-model", True), ("tiny_v5", None), ("models--google--gemma-3-270m-it", True),
])
def test_instruction_tuned_from_name(name, tuned):
    assert instruction_tuned_from_name(name) is tuned


def test_instruction_tuned_is_recorded_and_read_back():
    d = {"model_type": "gemma3_text", "num_hidden_layers": 2, "instruction_tuned": False}
    c = ModelConfig.from_dict(d)
    assert c.instruction_tuned is False and c.to_dict()["instruction_tuned"] is False
    assert ModelConfig.from_dict(c.to_dict()).instruction_tuned is False
    assert "instruction_tuned" not in ModelConfig.from_dict({"model_type": "gemma3_text"}).to_dict()  # unknown


def test_a_load_reads_config_and_headers_once(tiny_dirs, tmp_path, monkeypatch):
    """The cache's damage check and the load after it share one read of config.json and the weight
    headers; a directory whose files changed since is read again (and a damaged one is caught)."""
    import builtins
    import shutil

    from gemma3_mlx import models
    from gemma3_mlx.loader import Checkpoint, load

    d = shutil.copytree(tiny_dirs["tiny_v5"], tmp_path / "m")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    assert models.problem(d) is None
    with pytest.warns(UserWarning, match="no tokenizer.model"):  # the tiny fixture has none
        load(Checkpoint.read(d))
    assert sum(f.endswith("config.json") for f in opened) == 1
    assert sum(f.endswith(".safetensors") for f in opened) == 1
    first = Checkpoint.read(d)
    assert Checkpoint.read(d) is first
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg, indent=1))  # the same config, another file
    assert Checkpoint.read(d) is not first
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-16])  # truncated since
    assert "truncated" in models.problem(d)


def test_written_config_keeps_query_pre_attn_scalar_an_int(tmp_path):
    """transformers 5's strict Gemma3TextConfig refuses 256.0 (mlx-lm could not read our conversions): the
    converter writes a whole scale as an int, keeps one that is not whole, and the config reads back the same."""
    from gemma3_mlx.convert.writer import write_config

    for given, written in ((256, 256), (256.0, 256), (168, 168), (240.5, 240.5)):
        for mt in ("gemma3_text", "gemma3"):
            c = ModelConfig.from_dict({"model_type": mt, "query_pre_attn_scalar": given} if mt == "gemma3_text" else
                                      {"model_type": mt, "text_config": {"query_pre_attn_scalar": given}})
            write_config(tmp_path, c.to_dict())
            d = json.loads((tmp_path / "config.json").read_text())
            q = d.get("text_config", d)["query_pre_attn_scalar"]
            assert q == written and type(q) is type(written), (mt, given, q)
            assert ModelConfig.from_dict(d) == c
