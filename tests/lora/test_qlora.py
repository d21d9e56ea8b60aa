"""QLoRA: LoRALinear over NF4Linear, whole-model quantization, merge/re-quantize, save/load,
and a short training run against peft + bitsandbytes Linear4bit on CPU."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn

import lora
from lora import LoRAConfig, LoRALinear, NF4Linear, add_lora
from lora.nf4 import bits_per_parameter
from tests.models import VOCAB

bnb = pytest.importorskip("bitsandbytes")


def llama64(seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny llama whose linear in_features (64, 128) are multiples of the blocksize: the only
    shapes on which bitsandbytes' CPU 4-bit dequantization is right (see test_nf4.py)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def _batch(n=4, t=16, seed=0):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_lora_over_nf4_equals_lora_over_dequantized_dense():
    torch.manual_seed(0)
    base = NF4Linear.from_linear(nn.Linear(128, 64), double_quant=True)
    dense = base.to_linear(torch.float32)
    torch.manual_seed(1)
    ours = LoRALinear(base, r=4, alpha=8)
    torch.manual_seed(1)
    ref = LoRALinear(dense, r=4, alpha=8)
    for layer in (ours, ref):  # a non-zero B so the adapter contributes
        torch.manual_seed(2)
        nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = ours(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours, name).weight.grad,
                                   getattr(ref, name).weight.grad, atol=0, rtol=0)


def _bnb_quantize(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """The reference: every nn.Linear but lm_head as a bitsandbytes NF4+DQ Linear4bit."""
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear or name.endswith("lm_head"):
            continue
        q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4",
                              compress_statistics=True)
        q.weight = bnb.nn.Params4bit(mod.weight.detach().clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True,
                                     blocksize=64).to("cpu")  # quantizes on the move
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, q)
    return model


def _train(model, params, steps=5, lr=1e-2):
    ids = _batch()
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# fp32 compute: both sides run the same dequantize + F.linear, so only summation order of
# autograd may differ (1e-6). bf16 compute: one bf16 rounding per matmul (tolerance 1e-2).
@pytest.mark.parametrize("compute_dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)],
                         ids=["fp32", "bf16"])
def test_five_training_steps_match_peft_bitsandbytes(compute_dtype, tol):
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = _bnb_quantize(llama64(), compute_dtype).train()
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=targets))
    ours = lora.quantize_model(llama64(), blocksize=64, double_quant=True,
                               compute_dtype=compute_dtype).train()
    torch.manual_seed(1)
    add_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=targets))
    # same starting adapters (peft draws them in the same order; asserted, not assumed)
    ref_sd = {k.replace("base_model.model.", "").replace(".default", ""): v
              for k, v in ref.state_dict().items() if "lora_" in k}
    ours_sd = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert ref_sd.keys() == ours_sd.keys() and len(ours_sd) == 2 * 2 * len(targets)
    for k in ours_sd:
        torch.testing.assert_close(ours_sd[k], ref_sd[k], atol=0, rtol=0)
    # same frozen 4-bit bases
    q_ours = ours.model.layers[0].mlp.down_proj.base_layer
    q_ref = ref.base_model.model.model.layers[0].mlp.down_proj.base_layer
    assert torch.equal(q_ours.weight, q_ref.weight.data.view(torch.uint8))
    ref_losses = _train(ref, [p for p in ref.parameters() if p.requires_grad])
    our_losses = _train(ours, lora.lora_parameters(ours))
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(ref_losses),
                               atol=tol, rtol=tol)
    assert our_losses[-1] < our_losses[0]  # it actually trained


def test_quantize_model_skips_head_and_adapters_and_keeps_outputs_close():
    model = llama64()
    ids = _batch(2, 12)
    with torch.no_grad():
        dense_logits = model(ids).logits
    lora.quantize_model(model)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["lm_head"] is nn.Linear
    assert sum(k is NF4Linear for k in kinds.values()) == 2 * 7
    assert not any(k is nn.Linear for n, k in kinds.items() if n != "lm_head")
    with torch.no_grad():
        q_logits = model(ids).logits
    rel = (q_logits - dense_logits).norm() / dense_logits.norm()
    assert float(rel) < 0.2  # 4-bit weights: close but not equal
    # an adapted model: quantizing again leaves lora_A/lora_B dense and the base layers NF4
    add_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))
    lora.quantize_model(model)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q.lora_A) is nn.Linear and type(q.lora_B) is nn.Linear
    assert isinstance(q.base_layer, NF4Linear)


def test_dequantize_merge_requantize():
    model = lora.quantize_model(llama64())
    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    for p in lora.lora_parameters(model):  # non-zero adapters
        nn.init.normal_(p, std=0.05)
    ids = _batch(2, 12)
    with torch.no_grad():
        qlora_logits = model(ids).logits
    lora.dequantize_model(model, torch.float32)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    with torch.no_grad():  # dequantizing to fp32 changes nothing: the same values are used
        torch.testing.assert_close(model(ids).logits, qlora_logits, atol=0, rtol=0)
    lora.merge_lora(model)
    with torch.no_grad():
        merged = model(ids).logits
    torch.testing.assert_close(merged, qlora_logits, atol=1e-5, rtol=1e-5)
    lora.remove_lora(model, merge=True)
    lora.quantize_model(model)  # the explicit re-quantize step
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 2 * 7
    with torch.no_grad():
        requant = model(ids).logits
    rel = (requant - merged).norm() / merged.norm()
    assert float(rel) < 0.2


@pytest.mark.parametrize("double_quant,expected", [(False, 4.5), (True, 4.127)])
def test_memory_report_bits_per_param(double_quant, expected):
    lin = nn.Sequential(nn.Linear(1024, 1024, bias=False), nn.Linear(1024, 1024, bias=False))
    lora.quantize_model(lin, double_quant=double_quant)
    report = lora.memory_report(lin)
    assert report.layers == 2 and report.quantized_params == 2 * 1024 * 1024
    # only the per-tensor fp32 offset (double quant) is on top of the asymptotic formula
    assert report.bits_per_param == pytest.approx(bits_per_parameter(64, double_quant), abs=1e-4)
    assert report.bits_per_param == pytest.approx(expected, abs=1e-3)
    assert "bits/param" in str(report)


def test_save_load_round_trip_bitwise(tmp_path):
    model = lora.quantize_model(llama64(), double_quant=True)
    path = tmp_path / "q.safetensors"
    lora.save_quantized(model, path)
    fresh = llama64(seed=5)  # different dense weights, replaced by the file's
    lora.load_quantized(fresh, path)
    ids = _batch(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)
    layer = fresh.model.layers[1].self_attn.o_proj
    assert isinstance(layer, NF4Linear) and layer.state.double_quant
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind


def test_streamed_quantization_from_checkpoint_equals_in_memory(tmp_path):
    from safetensors.torch import save_file
    dense = llama64()
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(dense.config)
    lora.quantize_model(skeleton, checkpoint=path)
    lora.quantize_model(dense)
    assert not any(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])
    for (name, a), b in zip(dense.state_dict().items(), skeleton.state_dict().values()):
        assert torch.equal(a, b), name
    ids = _batch(2, 12)  # non-persistent buffers (rotary inv_freq) were rebuilt too
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids).logits, dense(ids).logits, atol=0, rtol=0)


def test_load_quantized_into_meta_skeleton(tmp_path):
    model = lora.quantize_model(llama64(), double_quant=False)
    path = tmp_path / "q.safetensors"
    lora.save_quantized(model, path)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(model.config)
    lora.load_quantized(skeleton, path)
    ids = _batch(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(skeleton(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_trainable_summary_and_adapter_selection_over_packed_parameters():
    """The packed NF4 weight is a frozen uint8 Parameter: never selected as an adapter tensor,
    counted as the weights it stands for, exactly as peft counts bitsandbytes' Params4bit."""
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "v_proj", "down_proj"]
    ref = _bnb_quantize(llama64(), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ours = add_lora(lora.quantize_model(llama64()), LoRAConfig(r=4, alpha=8, target_modules=targets))
    trainable, total = ref.get_nb_trainable_parameters()
    assert lora.trainable_summary(ours) == (f"trainable params: {trainable:,d} || all params: "
                                            f"{total:,d} || trainable%: {100 * trainable / total:.4f}")
    assert total == sum(p.numel() for p in llama64().parameters()) + trainable  # dense + adapters
    packed = [p for m in ours.modules() if isinstance(m, NF4Linear) for p in m.parameters()
              if p.dtype == torch.uint8]
    assert packed and not any(p.requires_grad for p in packed)
    chosen = {id(p) for p in lora.lora_parameters(ours)}
    assert not chosen & {id(p) for p in packed}
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(ours))
