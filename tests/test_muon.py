"""`--optimizer muon`: Muon against torch.optim.Muon, which parameters it takes, the chained optimizer's
learning rates and state, GradScaler through the chain, learning, exact resume, and the refusals."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest
import torch

from fidellm.errors import FidelError
from fidellm.models.factory import build_model, preset_config
from fidellm.models.llama import LlamaForCausalLM, preset
from fidellm.train import loop
from fidellm.train.checkpoint import latest_checkpoint
from fidellm.train.loop import train
from fidellm.train.muon import Muon, orthogonalize
from fidellm.train.optim import OptimizerChain, build_optimizer
from fidellm.train.step import optimizer_update
from test_train import SMALL, assert_same_weights, fresh_run, poison_fourth_step, small_config


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon came with torch 2.9")
def test_muon_steps_like_torch_muon() -> None:
    torch.manual_seed(0)
    shapes = [(48, 16), (48, 16), (16, 48), (32, 32)]  # two of one shape: orthogonalized as one batch
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    settings = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95}
    reference = torch.optim.Muon(theirs, adjust_lr_fn="match_rms_adamw", **settings)
    muon = Muon(ours, ns_dtype=torch.bfloat16, **settings)  # torch's iteration runs in bf16
    for _ in range(3):
        grads = [torch.randn(shape) for shape in shapes]
        for params, optimizer in ((ours, muon), (theirs, reference)):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()  # bf16 batched vs one by one
        assert not torch.equal(a, torch.zeros_like(a))


def test_the_skip_flag_keeps_a_bad_step_out_and_changes_no_good_one() -> None:
    """With `found_inf` set (the sync-free loop) a step whose gradients hold NaN, ±inf or a huge finite
    value leaves weights and momentum bit for bit; with it clear, the step equals one without the flag."""
    torch.manual_seed(0)
    shapes = [(48, 16), (48, 16), (32, 32)]
    flagged = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in flagged]
    with_flag, without = Muon(flagged, lr=0.02), Muon(plain, lr=0.02)
    for step in range(4):
        grads = [torch.randn(shape) for shape in shapes]
        bad = step == 2
        if bad:
            grads[0][0, 0], grads[1][3, 2], grads[2][1, 1] = math.nan, -math.inf, 3e38
            before = [(p.detach().clone(), with_flag.state[p]["momentum_buffer"].clone()) for p in flagged]
        for params in (flagged, plain):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
        with_flag.found_inf = torch.tensor(float(bad))  # type: ignore[attr-defined]
        with_flag.step()
        if bad:
            for p, (weight, momentum) in zip(flagged, before, strict=True):
                assert torch.equal(p, weight) and torch.equal(with_flag.state[p]["momentum_buffer"], momentum)
        else:
            without.step()
            for a, b in zip(flagged, plain, strict=True):
                assert torch.equal(a, b)


def test_orthogonalize_flattens_the_singular_values() -> None:
    torch.manual_seed(0)
    matrices = torch.randn(3, 64, 24) * torch.logspace(-1.5, 1, 24)  # condition numbers of about 470
    ortho = orthogonalize(matrices)
    singular = torch.linalg.svdvals(ortho)  # measured: 0.68 to 1.20 (the quintic overshoots 1 by design)
    assert singular.min() > 0.6 and singular.max() < 1.25, (singular.min(), singular.max())
    assert torch.allclose(orthogonalize(matrices[1:2]), ortho[1:2], atol=1e-5)  # each matrix on its own
    assert torch.allclose(orthogonalize(matrices.mT), ortho.mT, atol=1e-5)  # tall and wide alike
    with pytest.raises(FidelError, match=r"Muon takes 2-D matrices only; got parameters of shape \(4,\)"):
        Muon([torch.nn.Parameter(torch.ones(4))])


def _names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tied: bool) -> None:
    config = dataclasses.replace(preset("tiny", 512), num_hidden_layers=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    chain = build_optimizer(model, 1e-3, 0.1, kind="muon")
    assert isinstance(chain, OptimizerChain)
    muon, adamw = chain.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    matrices = _names(model, muon)
    assert len(matrices) == 2 * 7 and all(n.endswith("_proj.weight") for n in matrices)
    rest = _names(model, adamw)
    assert "model.embed_tokens.weight" in rest and ("lm_head.weight" in rest) is not tied
    assert all(n.endswith("norm.weight") for n in rest - {"model.embed_tokens.weight", "lm_head.weight"})
    assert len(matrices) + len(rest) == len(list(model.parameters()))  # every parameter once
    assert all(g["weight_decay"] == 0.1 for g in muon.param_groups)
    assert muon.defaults["momentum"] == 0.95 and not chain.skips_on_device  # CPU: AdamW is not fused


def test_hnet_convolutions_and_dynamics_stay_with_adamw() -> None:
    model = build_model(preset_config("hnet", "hnet-tiny", 256, 512, {}))
    muon, adamw = build_optimizer(model, 1e-3, 0.1, kind="muon").optimizers
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    rest = _names(model, adamw)
    assert any("conv1d" in n for n in rest) and "lm_head.weight" in rest and any("A_log" in n for n in rest)


def test_learning_rates_reach_the_members_also_after_a_state_load() -> None:
    model = LlamaForCausalLM(dataclasses.replace(preset("tiny", 512), num_hidden_layers=2))
    chain = build_optimizer(model, 1e-3, 0.1, kind="muon")
    model(torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))).loss.backward()
    chain.step()
    other = build_optimizer(model, 1e-3, 0.1, kind="muon")
    other.load_state_dict(chain.state_dict())  # torch gives the members new group dicts here
    for group in other.param_groups:
        group["lr"] = 0.25
    assert all(g["lr"] == 0.25 for member in other.optimizers for g in member.param_groups)
    saved, loaded = chain.optimizers[0].state_dict()["state"], other.optimizers[0].state_dict()["state"]
    assert saved.keys() == loaded.keys() and all(
        torch.equal(saved[k]["momentum_buffer"], loaded[k]["momentum_buffer"]) for k in saved
    )
    with pytest.raises(KeyError):  # an AdamW state does not fit: the checkpoint reader names the file
        other.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_grad_scaler_steps_the_chain_like_unscaled_gradients() -> None:
    results = []
    for scale in (None, 1024.0):
        torch.manual_seed(0)
        model = LlamaForCausalLM(dataclasses.replace(preset("tiny", 512), num_hidden_layers=2))
        initial = [p.detach().clone() for p in model.parameters()]
        chain = build_optimizer(model, 1e-2, 0.1, kind="muon")
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        loss = model(torch.arange(32).view(2, 16), torch.arange(1, 33).view(2, 16)).loss
        scaler.scale(loss).backward()
        norm = optimizer_update(model, chain, scaler, 1.0, loss.detach()[None], skip_on_device=False)
        after = [p.detach().clone() for p in model.parameters()]
        assert all(not torch.equal(a, b) for a, b in zip(initial, after, strict=True))  # every tensor moved
        results.append((norm, after))
    (norm, plain), (scaled_norm, scaled) = results
    assert torch.allclose(norm, scaled_norm, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, scaled, strict=True))


def test_muon_resumes_bit_for_bit_and_refuses_a_switch(flores_run: Path, tmp_path: Path) -> None:
    config = small_config(model_overrides=SMALL, optimizer="muon", lr=1e-2, max_steps=8)
    straight = train(fresh_run(flores_run, tmp_path / "a"), config)
    run = fresh_run(flores_run, tmp_path / "b")
    first = train(run, dataclasses.replace(config, stop_at_step=5))
    second = train(run, config)
    assert first["losses"] == straight["losses"][:5] and second["losses"] == straight["losses"][5:]
    assert second["val_bpb"] == straight["val_bpb"]
    with pytest.raises(FidelError, match='cannot resume with optimizer "muon" → "adamw"'):
        train(run, dataclasses.replace(config, optimizer="adamw", max_steps=10))


def test_muon_trains_the_small_model_further_than_adamw(flores_run: Path, tmp_path: Path) -> None:
    losses = {}
    for optimizer in ("adamw", "muon"):
        config = small_config(
            model_overrides=SMALL, max_steps=80, eval_every=80, lr=1e-2, warmup_steps=5, optimizer=optimizer
        )
        losses[optimizer] = train(fresh_run(flores_run, tmp_path / optimizer), config)["val_loss"]
    # measured: adamw 5.21, muon 4.39 (val loss after 80 steps, 512-token vocabulary)
    assert losses["muon"] < losses["adamw"] - 0.4 and losses["adamw"] < math.log(512) - 0.6, losses


def test_an_unknown_optimizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FidelError, match="optimizer 'sgd' is not one of adamw, muon"):
        train(tmp_path, small_config(optimizer="sgd"))


def test_cli_takes_the_optimizer(flores_run: Path, tmp_path: Path) -> None:
    from fidellm.cli import main

    run = fresh_run(flores_run, tmp_path)
    main(["train", str(run), "--optimizer", "muon", "--steps", "2", "--seq-len", "64", "--batch-size", "2",
          "--eval-every", "2", "--warmup", "1", "--device", "cpu"])  # fmt: skip
    saved = (run / "train" / "config.json").read_text()
    assert '"optimizer": "muon"' in saved


def test_sync_free_muon_trains_like_the_checked_loop_and_skips_a_nan_step(
    flores_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the loop never waits for a loss: Muon (and the fused AdamW beside it) skip a non-finite
    step on the device. Here the CPU plays CUDA, as in test_train's sync-free tests."""
    monkeypatch.setattr(loop, "build_optimizer", functools.partial(build_optimizer, fused=True))
    config = small_config(optimizer="muon")
    checked = train(fresh_run(flores_run, tmp_path / "checked"), config)
    monkeypatch.setattr(loop, "SYNC_FREE_DEVICES", ("cuda", "cpu"))
    late = train(fresh_run(flores_run, tmp_path / "late"), config)
    assert late["losses"] == checked["losses"] and late["val_loss"] == checked["val_loss"]
    assert_same_weights(Path(late["checkpoint"]), Path(checked["checkpoint"]))
    clean = fresh_run(flores_run, tmp_path / "clean")
    train(clean, dataclasses.replace(config, save_every=0, stop_at_step=3))
    poisoned = fresh_run(flores_run, tmp_path / "poisoned")
    poison_fourth_step(monkeypatch)
    with pytest.raises(FidelError, match=r"non-finite loss .* at step 4"):
        train(poisoned, dataclasses.replace(config, save_every=0))
    saved = latest_checkpoint(poisoned / "train/checkpoints")
    assert saved is not None and saved.name == "step_00000003"
    assert_same_weights(saved, clean / "train/checkpoints/step_00000003")  # the NaN step changed nothing
