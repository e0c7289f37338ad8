"""H-Net cached generation: a (right-padded) prefill plus byte-by-byte steps equal the full forward;
a generated BOS ends the text."""

from __future__ import annotations

import pytest
import torch

from fidellm.errors import FidelError
from fidellm.generate import GenerationConfig, generate
from fidellm.generate.config import default_stop_ids
from fidellm.models.hnet import HNetForCausalLM, preset
from fidellm.tokenizer.bytes import ByteTokenizer


@pytest.mark.parametrize("name", ["hnet-tiny", "hnet-2s-tiny"])
def test_prefill_and_steps_equal_the_full_forward(name: str) -> None:
    torch.manual_seed(0)
    model = HNetForCausalLM(preset(name, max_position_embeddings=128)).eval()
    generator = torch.Generator().manual_seed(1)
    lengths, steps = [20, 13], 30
    rows = [torch.randint(0, 254, (n + steps,), generator=generator) for n in lengths]
    for row in rows:
        row[0] = 254
    rows[0][30] = 254  # a document starts during the steps
    prompt = torch.full((2, max(lengths)), 255)
    mask = torch.zeros(2, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        prompt[i, :n], mask[i, :n] = rows[i][:n], 1
    continuation = torch.stack([row[n : n + steps] for row, n in zip(rows, lengths, strict=True)])
    with torch.no_grad():
        cache = model.new_cache()
        prefill = model(prompt, cache=cache, attention_mask=mask)
        stepped = torch.cat([model(continuation[:, t : t + 1], cache=cache).logits for t in range(steps)], 1)
        for i, n in enumerate(lengths):
            full = model(rows[i][None]).logits[0]
            torch.testing.assert_close(prefill.logits[i, :n], full[:n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(stepped[i], full[n:], atol=1e-5, rtol=1e-5)
    assert cache.length == max(lengths) + steps


def test_several_bytes_per_call_and_limits() -> None:
    torch.manual_seed(0)
    model = HNetForCausalLM(preset("hnet-tiny", max_position_embeddings=24)).eval()
    ids = torch.randint(0, 254, (1, 24))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :10], cache=cache)
        rest = model(ids[:, 10:], cache=cache).logits
        torch.testing.assert_close(rest, model(ids).logits[:, 10:], atol=1e-5, rtol=1e-5)
        with pytest.raises(FidelError, match="max_position_embeddings"):
            model(ids[:, :1], cache=cache)
        cache = model.new_cache()
        model(ids[:, :4], cache=cache)
        with pytest.raises(FidelError, match="prefill only"):
            model(ids[:, 4:5], cache=cache, attention_mask=torch.ones(1, 5))


def test_a_generated_bos_ends_the_document() -> None:
    """Byte training windows separate documents by BOS (254) alone, never EOS (255): a generated BOS
    is the end of the text, not a hidden byte before an unrelated document."""
    torch.manual_seed(0)
    model = HNetForCausalLM(preset("hnet-tiny", max_position_embeddings=64)).eval()
    head = torch.nn.Linear(model.lm_head.in_features, 256, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[254] = 10.0  # the model always predicts a new document
    model.lm_head = head
    tokenizer = ByteTokenizer()
    assert 254 in default_stop_ids(model, tokenizer)
    result = generate(model, tokenizer, ["ሰላም"], GenerationConfig(max_new_tokens=8, temperature=0.0))[0]
    assert (result.finish_reason, result.stop, result.token_ids, result.text) == ("stop", 254, [254], "")
