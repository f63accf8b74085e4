import pytest

from conftest import GPT_CONFIG_124M
from gptforge import PRESETS, GPTConfig, GPTModel, preset


def test_accepts_the_books_dict_and_indexing():
    cfg = GPTConfig(**GPT_CONFIG_124M)
    assert cfg == GPTConfig.from_dict(GPT_CONFIG_124M) == preset("book-124m")
    assert cfg["emb_dim"] == 768 and cfg.head_dim == 64
    assert GPTModel(GPT_CONFIG_124M).cfg == cfg


@pytest.mark.parametrize("field, value, rule", [
    ("vocab_size", 0, "positive"),
    ("context_length", -1, "positive"),
    ("n_layers", 2.5, "positive"),
    ("n_heads", 5, "divisible"),
    ("drop_rate", 1.0, "0 <= drop_rate < 1"),
    ("drop_rate", -0.1, "0 <= drop_rate < 1"),
    ("qkv_bias", "yes", "true or false"),
    ("init", "xavier", "init must be one of"),
])
def test_validation_names_field_and_rule(field, value, rule):
    with pytest.raises(ValueError) as err:
        GPTConfig(**{**GPT_CONFIG_124M, field: value})
    assert rule in str(err.value)
    assert field in str(err.value)


def test_unknown_keys_and_presets_are_rejected_by_name():
    with pytest.raises(ValueError, match="emb_dimm"):
        GPTConfig.from_dict({**GPT_CONFIG_124M, "emb_dimm": 3})
    with pytest.raises(ValueError, match="gpt2-124m"):
        preset("gpt3")


def test_wrong_types_and_unknown_replacements_are_gptforge_errors():
    from gptforge import GptforgeError, count_parameters

    for name in (None, 124):  # were AttributeErrors: 'NoneType' object has no attribute 'lower'
        with pytest.raises(GptforgeError, match="preset is named by a string"):
            preset(name)
    for cfg in (42, None):  # were TypeErrors
        with pytest.raises(GptforgeError, match="expected a GPTConfig, a dict or a preset name"):
            GPTModel(cfg)
    with pytest.raises(GptforgeError, match="expected a GPTConfig"):
        count_parameters(3)
    with pytest.raises(GptforgeError, match="emb_dimm"):
        preset("gpt2-124m").replace(emb_dimm=3)


def test_presets_match_released_gpt2_configs():
    transformers = pytest.importorskip("transformers")
    hub_names = {"gpt2-124m": (768, 12, 12), "gpt2-355m": (1024, 24, 16),
                 "gpt2-774m": (1280, 36, 20), "gpt2-1558m": (1600, 48, 25)}
    for name, (d, layers, heads) in hub_names.items():
        cfg = PRESETS[name]
        hf = transformers.GPT2Config(n_embd=d, n_layer=layers, n_head=heads)
        assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (hf.n_embd, hf.n_layer, hf.n_head)
        assert (cfg.vocab_size, cfg.context_length) == (hf.vocab_size, hf.n_positions)
        assert cfg.qkv_bias and cfg.tie_weights and cfg.drop_rate == hf.resid_pdrop
    assert not PRESETS["book-124m"].qkv_bias and not PRESETS["book-124m"].tie_weights
