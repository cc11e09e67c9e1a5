"""Loss and backward through the converted model on CPU (backend='reference', float64)."""

import copy

import pytest
import torch
from torch.nn import functional as F
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

from model import (
    convert_to_nsa,
    random_model,
    synthetic_batch,
    tiny_nsa_config,
    tiny_qwen2_5_vl_config,
)

NSA = tiny_nsa_config()
SAMPLES = [[5, (4, 4, 4), 6], [3, (2, 4, 4), 4, (4, 4, 4), 2]]


@pytest.fixture(scope="module")
def model():
    model = convert_to_nsa(random_model(tiny_qwen2_5_vl_config()), NSA)
    torch.manual_seed(2)
    for layer in model.model.language_model.layers:  # non-zero g_proj_2 so g_proj_1 gets gradient
        with torch.no_grad():
            layer.self_attn.g_proj_2.weight.normal_(0, 0.2)
    return model


def batch_with_labels(config):
    batch = synthetic_batch(config, SAMPLES, padding_side="left", dtype=torch.float64)
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (batch["input_ids"] >= 250)] = -100
    return dict(batch, labels=labels)


def float64_loss(model, batch):
    """Next-token cross-entropy in float64 (upstream's loss upcasts logits to float32 only)."""
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = float64_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_backward_reaches_gates_text_and_vision(model):
    model.train()
    try:
        out = model(**batch_with_labels(model.config))  # upstream's loss path
        model.zero_grad()
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.eval()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    for name in (
        "model.language_model.layers.0.self_attn.g_proj_1.weight",
        "model.language_model.layers.0.self_attn.g_proj_2.bias",  # (the last layer's video rows reach no label)
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.visual.blocks.0.attn.qkv.weight",
    ):
        assert grads[name].abs().max() > 0, name


def rms_norm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_gradient_matches_finite_difference(model, monkeypatch):
    """Directional derivative along the gradient (gates, layer 1's q/k/v projections: span and
    dense rows both reach them), central differences.

    Upstream's RMSNorm computes in float32 even for float64 inputs, which alone gives finite
    differences ~1e-3 relative noise; the test runs it in float64 instead.
    """
    monkeypatch.setattr(modeling.Qwen2_5_VLRMSNorm, "forward", rms_norm_in_input_dtype)
    batch = batch_with_labels(model.config)
    _, grads = loss_and_grads(model, batch)
    params = {n: p for n, p in model.named_parameters() if "layers.0.self_attn.g_proj_" in n or any(f"layers.1.self_attn.{x}_proj" in n for x in "qkv")}
    direction = {n: grads[n] / grads[n].norm() for n in params}
    eps = 1e-5

    def shifted_loss(sign):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(sign * eps * direction[n])
            loss = float64_loss(model, batch)
            for n, p in params.items():
                p.sub_(sign * eps * direction[n])
        return loss

    numeric = (shifted_loss(1) - shifted_loss(-1)) / (2 * eps)
    analytic = sum((grads[n] * direction[n]).sum() for n in params)
    assert analytic > 1e-4
    torch.testing.assert_close(numeric, analytic, rtol=1e-6, atol=0)


def test_gradient_checkpointing_gives_same_gradients(model):
    """Recomputed layers get the same video spans (they travel as a keyword, not as state)."""
    batch = batch_with_labels(model.config)
    loss, grads = loss_and_grads(model, batch)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    ckpt.train()
    loss_ckpt, grads_ckpt = loss_and_grads(ckpt, batch)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-12)
    for name in ("model.language_model.layers.0.self_attn.g_proj_1.weight", "model.language_model.layers.1.self_attn.q_proj.weight"):
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-12)
