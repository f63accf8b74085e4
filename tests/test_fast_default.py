"""The fast float32 layout by default: generate() on a plain GPTModel decodes through a cached
inference view, with the same tokens, and the model, its state dict and training see nothing."""

from __future__ import annotations

import copy

import pytest
import torch

from gptforge import GPTConfig, GPTModel, generate, generate_text_simple
from gptforge.fast import inference_view

from gen_helpers import hf_twin


def _model(tiny_config, **changes) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig.from_dict(tiny_config(context_length=32, **changes)))


def test_generate_uses_the_view_and_matches_the_references(tiny_config):
    model = _model(tiny_config, vocab_size=256, qkv_bias=True).eval()
    idx = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    view = inference_view(model)
    assert view is not model
    # the view reads the model's own tensors: no second copy of any weight
    assert {p.data_ptr() for p in view.parameters()} == {p.data_ptr() for p in model.parameters()}
    assert inference_view(model) is view  # cached while the parameters are the same tensors
    ours = generate(model, idx, 20, stop_token_ids=())
    assert torch.equal(ours, generate_text_simple(model.eval(), idx, 20, 32))
    hf = hf_twin(model).generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, min_new_tokens=20,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, hf)


@pytest.mark.parametrize("fused", [False, True])
def test_state_dict_and_training_are_untouched(tiny_config, fused):
    model = _model(tiny_config, vocab_size=256).eval()
    before = copy.deepcopy(model.state_dict())
    layout = {k: (v.data_ptr(), v.stride()) for k, v in model.state_dict().items()}
    idx = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    first = generate(model, idx, 8, stop_token_ids=())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {k: (v.data_ptr(), v.stride()) for k, v in after.items()} == layout
    assert inference_view(model) is not model and not model.training
    assert all(m.fused_qkv is None for m in (b.att for b in model.trf_blocks))

    # A training step after generate still works, and the next generate sees the new weights.
    view = inference_view(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)  # fused: no version bump
    model.train()
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    optimizer.step()
    second = generate(model, idx, 8, stop_token_ids=())  # in training mode: the model as it is
    assert model.training
    model.eval()
    assert inference_view(model) is view  # new values in the same tensors: the view reads them as they are
    assert torch.equal(generate(model, idx, 8, stop_token_ids=()), second)
    assert torch.equal(second, generate_text_simple(copy.deepcopy(model).eval(), idx, 8, 32))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_view_sees_in_place_edits_made_through_data(tiny_config, batch):
    # The usual EMA / weight-surgery idiom changes values without a version bump: the view must follow.
    model = _model(tiny_config, vocab_size=256, qkv_bias=True).eval()
    idx = torch.randint(0, 256, (batch, 5), generator=torch.Generator().manual_seed(6))
    before = generate(model, idx, 8, stop_token_ids=())
    view = inference_view(model)
    for block in model.trf_blocks:
        block.att.W_query.weight.data.mul_(0)
        block.ff.layers[0].weight.data.mul_(-1)
    model.out_head.weight.data.mul_(0.5)
    after = generate(model, idx, 8, stop_token_ids=())
    assert inference_view(model) is view
    assert torch.equal(after, generate_text_simple(copy.deepcopy(model).eval(), idx, 8, 32))
    assert not torch.equal(before, after)


def test_a_model_with_lora_adapters_is_viewed_anew_each_call(tiny_config):
    from gptforge.lora import apply_lora

    model = _model(tiny_config, vocab_size=256).eval()
    apply_lora(model, rank=2, alpha=4.0)
    idx = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(7))
    generate(model, idx, 4, stop_token_ids=())
    for name, p in model.named_parameters():
        if "lora" in name:
            p.data.normal_(0, 0.5)  # the adapters' update, in place
    assert torch.equal(generate(model, idx, 8, stop_token_ids=()),
                       generate_text_simple(copy.deepcopy(model).eval(), idx, 8, 32))
