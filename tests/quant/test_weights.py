"""Tests for quant.weights: per-tensor INT8, QuantLinear, whole-model quantizers and byte counting."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_llama import tiny_llama
from torch import nn

from quant.weights import (
    WEIGHT_QUANTIZERS,
    QuantLinear,
    dequantize_int8_per_tensor,
    quantize_int8_per_tensor,
    quantize_model_weights,
    register_weight_quantizer,
    tensor_nbytes,
    weight_nbytes,
)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- per-tensor INT8 ---------------------------------------------------------------------------------
def test_int8_round_trip_error_is_at_most_half_a_step():
    x = torch.randn(37, 53) * 3.0
    q, scale = quantize_int8_per_tensor(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dim() == 0 and scale.item() == pytest.approx(x.abs().max().item() / 127)
    err = (dequantize_int8_per_tensor(q, scale) - x).abs().max().item()
    assert err <= scale.item() / 2 * (1 + 1e-5)
    assert q.abs().max().item() == 127  # the full range is used


def test_int8_zero_tensor_and_bad_input():
    q, scale = quantize_int8_per_tensor(torch.zeros(4, 4))
    assert scale.item() == 1.0 and q.eq(0).all()
    with pytest.raises(ValueError, match="floating-point"):
        quantize_int8_per_tensor(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int8"):
        dequantize_int8_per_tensor(torch.ones(3), torch.tensor(1.0))


# --- QuantLinear -------------------------------------------------------------------------------------
def test_quant_linear_close_to_float_and_stores_int8():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    qlinear = QuantLinear.from_linear(linear)
    x = torch.randn(5, 7, 64)
    with torch.no_grad():
        assert rel_err(qlinear(x), linear(x)) < 0.02
    assert qlinear.weight_q.dtype == torch.int8
    assert list(qlinear.parameters()) == []  # no float copy of the weight is kept
    assert qlinear.state_dict()["weight_q"].dtype == torch.int8
    assert qlinear.nbytes() == 64 * 32 + 4 + 32 * 4  # codes + scale + float bias
    assert rel_err(qlinear.weight, linear.weight.detach()) < 0.01


def test_quant_linear_without_bias_and_bad_input():
    qlinear = QuantLinear.from_linear(nn.Linear(16, 8, bias=False))
    assert qlinear.bias is None and qlinear.nbytes() == 16 * 8 + 4
    assert qlinear(torch.randn(3, 16)).shape == (3, 8)
    with pytest.raises(ValueError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(3, 3, 1))


# --- whole-model quantizers --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "max_rel_err"),
    [("none", 0.0), ("int8-pertensor", 0.05), ("int8", 0.02), ("int4", 0.25)],
)
def test_quantize_model_weights_keeps_logits_close_and_shrinks(model, input_ids, method, max_rel_err):
    with torch.no_grad():
        ref = model(input_ids).logits
    qmodel = quantize_model_weights(copy.deepcopy(model), method)
    with torch.no_grad():
        out = qmodel(input_ids).logits
    assert rel_err(out, ref) <= max_rel_err
    assert type(qmodel.lm_head) is nn.Linear  # lm_head is never quantized
    if method == "none":
        assert weight_nbytes(qmodel) == weight_nbytes(model)
    else:
        assert weight_nbytes(qmodel) < weight_nbytes(model)
        assert not any(type(m) is nn.Linear for n, m in qmodel.named_modules() if n != "lm_head")


def test_int8_pertensor_saves_three_quarters_of_linear_bytes(model):
    linear_bytes = sum(
        m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
    )
    n_linear = sum(1 for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    qmodel = quantize_model_weights(copy.deepcopy(model), "int8-pertensor")
    # Llama's linears have no bias: each keeps its int8 codes plus one float32 scale.
    assert weight_nbytes(model) - weight_nbytes(qmodel) == linear_bytes * 3 // 4 - 4 * n_linear


@pytest.mark.parametrize("method", ["int8-pertensor", "int8", "int4"])
def test_tied_lm_head_stays_tied_and_counts_once(input_ids, method):
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qmodel = quantize_model_weights(model, method)
    assert type(qmodel.lm_head) is nn.Linear
    assert qmodel.lm_head.weight is qmodel.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.isfinite(qmodel(input_ids).logits).all()


def test_weight_nbytes_counts_quanto_packed_storage_honestly():
    from optimum.quanto import freeze, qint4, quantize

    module = nn.Sequential(nn.Linear(256, 64))
    float_bytes = weight_nbytes(module)
    assert float_bytes == (256 * 64 + 64) * 4
    quantize(module, weights=qint4)
    freeze(module)
    # quanto picks group size 128 for 256 input features: 4-bit codes two per byte, one float32 scale and
    # one float32 shift per group of 128, the float bias, and QLinear's two scalar activation-scale buffers.
    groups = 64 * 256 // 128
    assert weight_nbytes(module) == 64 * 256 // 2 + 2 * groups * 4 + 64 * 4 + 2 * 4
    assert tensor_nbytes(None) == 0


def test_unknown_method_and_double_quantization_are_rejected(model):
    with pytest.raises(ValueError, match="int8-pertensor"):
        quantize_model_weights(copy.deepcopy(model), "int3")
    qmodel = quantize_model_weights(copy.deepcopy(model), "int8-pertensor")
    with pytest.raises(ValueError, match="already weight-quantized"):
        quantize_model_weights(qmodel, "int4")


def test_registry_rejects_duplicate_names():
    assert {"none", "int8-pertensor", "int8", "int4"} <= set(WEIGHT_QUANTIZERS)
    with pytest.raises(ValueError, match="already registered"):
        register_weight_quantizer("int8")(lambda m: m)
