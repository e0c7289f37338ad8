"""The fused output-projection loss: the same loss and gradients as logits + cross-entropy, chunk by chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fidellm.models.loss import IGNORE_INDEX, linear_cross_entropy, token_cross_entropy
from fixtures.models import gqa_config, random_llama


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What the chunked loss replaces: all logits, in fp32, then the mean cross-entropy."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


def loss_and_grads(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **autocast):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", **autocast) if autocast else torch.autocast("cpu", enabled=False):
        loss = loss_fn(hidden, weight, targets)
    (2.5 * loss).backward()  # a non-unit upstream gradient must scale both gradients
    return loss.detach(), hidden.grad, weight.grad


def random_problem(tokens: int = 97, dim: int = 24, vocab: int = 301, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, tokens, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) * 0.3
    targets = torch.randint(0, vocab, (3, tokens), generator=generator)
    targets[0, :10] = IGNORE_INDEX
    targets[2, -3:] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 7, 97, 291, 10_000])
def test_fp32_loss_and_gradients_equal_the_materialized_logits(chunk: int) -> None:
    hidden, weight, targets = random_problem()
    want = loss_and_grads(reference, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk), hidden, weight, targets)
    for ours, theirs in zip(got, want, strict=True):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_the_autocast_linear_head() -> None:
    hidden, weight, targets = random_problem(seed=1)
    want = loss_and_grads(reference, hidden, weight, targets, dtype=torch.bfloat16)
    got = loss_and_grads(
        lambda h, w, t: linear_cross_entropy(h, w, t, 16), hidden, weight, targets, dtype=torch.bfloat16
    )
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)  # same bf16 logits, fp32 softmax
    for ours, theirs in zip(got[1:], want[1:], strict=True):
        assert ours.dtype == theirs.dtype == torch.float32
        # the reference rounds the whole weight gradient to bf16 once; ours sums chunks in fp32
        assert (ours - theirs).abs().max() <= 0.01 * theirs.abs().max()


def test_nothing_to_predict_is_zero_not_nan() -> None:
    hidden, weight, targets = random_problem()
    loss, grad_hidden, grad_weight = loss_and_grads(
        lambda h, w, t: linear_cross_entropy(h, w, t, 8), hidden, weight, torch.full_like(targets, -100)
    )
    assert loss.item() == 0.0
    assert not grad_hidden.any() and not grad_weight.any()


def test_frozen_weight_and_no_grad_skip_the_gradients_they_do_not_need() -> None:
    hidden, weight, targets = random_problem()
    with torch.no_grad():
        assert torch.allclose(
            linear_cross_entropy(hidden, weight, targets, 5), reference(hidden, weight, targets)
        )
    leaf = hidden.clone().requires_grad_()
    linear_cross_entropy(leaf, weight, targets, 5).backward()
    assert leaf.grad is not None and weight.grad is None
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        linear_cross_entropy(hidden, weight, targets, 0)


@pytest.mark.parametrize("tie", [True, False])
def test_model_gradients_equal_with_and_without_chunking(tie: bool) -> None:
    model = random_llama(gqa_config(tie_word_embeddings=tie)).train()
    torch.manual_seed(4)
    inputs, targets = torch.randint(0, 320, (2, 40)), torch.randint(0, 320, (2, 40))
    targets[1, :6] = IGNORE_INDEX

    def step(chunk: int):
        model.zero_grad()
        model.loss_chunk_tokens = chunk
        out = model(inputs, targets)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters()}

    full, full_grads = step(0)
    chunked, chunked_grads = step(11)
    assert full.logits is not None and chunked.logits is None
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-6, atol=0)
    assert full_grads.keys() == chunked_grads.keys()
    for name, grad in full_grads.items():  # summation order differs: compare against the largest entry
        assert (chunked_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-8, name


def test_compiles_in_one_graph_with_the_same_result() -> None:
    model = random_llama(gqa_config(num_hidden_layers=1)).train()
    model.loss_chunk_tokens = 16
    inputs, targets = torch.randint(0, 320, (2, 24)), torch.randint(0, 320, (2, 24))
    eager = model(inputs, targets).loss
    compiled = torch.compile(model, fullgraph=True)(inputs, targets).loss
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    compiled.backward()
    assert model.model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("chunk", [1, 50, 10_000])
def test_per_token_losses_equal_cross_entropy_without_reduction(chunk: int) -> None:
    hidden, weight, targets = random_problem(seed=2)
    got = token_cross_entropy(hidden, weight, targets, chunk)
    want = F.cross_entropy(
        F.linear(hidden, weight).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    assert got.shape == targets.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not got[targets == IGNORE_INDEX].any()


def test_per_token_losses_skip_ignored_rows_eagerly_and_all_rows_under_compile() -> None:
    hidden, weight, targets = random_problem(seed=3)
    assert not token_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE_INDEX), 7).any()
    eager = token_cross_entropy(hidden, weight, targets, 7)  # only the rows with a target
    compiled = torch.compile(token_cross_entropy, fullgraph=True)(hidden, weight, targets, 7)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_models_give_per_token_losses_whose_mean_is_the_loss() -> None:
    from fidellm.models.hnet import HNetForCausalLM, preset

    llama = random_llama(gqa_config())
    inputs, targets = torch.randint(0, 320, (2, 30)), torch.randint(0, 320, (2, 30))
    targets[0, :4] = IGNORE_INDEX
    kept = targets != IGNORE_INDEX
    per_token = {}
    for chunk in (0, 7):
        llama.loss_chunk_tokens = chunk
        per_token[chunk] = llama(inputs, targets, reduction="none").loss
        assert per_token[chunk].shape == targets.shape
        torch.testing.assert_close(per_token[chunk][kept].mean(), llama(inputs, targets).loss)
    torch.testing.assert_close(per_token[7], per_token[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduction must be one of"):
        llama(inputs, targets, reduction="sum")

    torch.manual_seed(0)
    hnet = HNetForCausalLM(preset("hnet-tiny", max_position_embeddings=64)).eval()
    byte_inputs, byte_targets = torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 40))
    byte_targets[1, -5:] = IGNORE_INDEX
    per_byte = hnet(byte_inputs, byte_targets, reduction="none").loss
    torch.testing.assert_close(
        per_byte[byte_targets != IGNORE_INDEX].mean(), hnet(byte_inputs, byte_targets).loss
    )
    assert not per_byte[byte_targets == IGNORE_INDEX].any()


def test_logits_to_keep_gives_the_last_positions_of_the_full_forward() -> None:
    from fidellm.models.hnet import HNetForCausalLM, preset

    llama = random_llama(gqa_config())
    inputs, targets = torch.randint(0, 320, (2, 30)), torch.randint(0, 320, (2, 30))
    full = llama(inputs).logits
    torch.testing.assert_close(llama(inputs, logits_to_keep=4).logits, full[:, -4:])
    per_token = llama(inputs, targets, reduction="none").loss
    for chunk in (0, 3):  # the loss counts the kept positions' targets only, chunked or not
        llama.loss_chunk_tokens = chunk
        kept = llama(inputs, targets, reduction="none", logits_to_keep=4).loss
        torch.testing.assert_close(kept, per_token[:, -4:], rtol=1e-5, atol=1e-6)
    # a left-padded prefill and a cached step keep their last position's logits too
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :5] = 0
    cache = llama.new_cache()
    prefill = llama(inputs, cache=cache, attention_mask=mask, logits_to_keep=1).logits
    torch.testing.assert_close(prefill, llama(inputs, attention_mask=mask).logits[:, -1:])
    step = llama(
        targets[:, -1:], cache=cache, attention_mask=torch.cat([mask, mask[:, -1:]], 1), logits_to_keep=1
    )
    assert step.logits.shape == (2, 1, full.shape[-1])
    with pytest.raises(ValueError, match="logits_to_keep"):
        llama(inputs, logits_to_keep=-1)

    torch.manual_seed(0)
    hnet = HNetForCausalLM(preset("hnet-tiny", max_position_embeddings=64)).eval()
    byte_inputs, byte_targets = torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full_bytes = hnet(byte_inputs, byte_targets, reduction="none")
        kept_bytes = hnet(byte_inputs, byte_targets, reduction="none", logits_to_keep=6)
        torch.testing.assert_close(kept_bytes.logits, full_bytes.logits[:, -6:])
        torch.testing.assert_close(kept_bytes.loss, full_bytes.loss[:, -6:])
        cache = hnet.new_cache()
        hnet(byte_inputs[:, :30], cache=cache)
        stepped = hnet(byte_inputs[:, 30:], cache=cache, logits_to_keep=2).logits
        torch.testing.assert_close(stepped, full_bytes.logits[:, -2:], rtol=1e-4, atol=1e-4)
