"""Streaming sharded checkpoints into meta models (dense and NF4), tied weights, HF's own save.

Every checkpoint is written by transformers' ``save_pretrained`` with a small
``max_shard_size``, so each test reads several shards; the reference is transformers'
``from_pretrained`` (then ``quantize_model`` for the 4-bit cases), built in the same test.
"""
from __future__ import annotations

import pytest
import torch
import transformers

import lora
from lora.nf4_linear import NF4Linear
from tests.models import bert_config, causal_config, tiny_bert_classifier

FAMILIES = ("llama", "qwen2", "mistral", "opt", "gpt2")
QLORA = lora.NF4Config(skip=("lm_head",), double_quant=True)


def _save_sharded(model, folder, dtype=None):
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    return shards


def _skeleton(config, auto=transformers.AutoModelForCausalLM, dtype=torch.float32):
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype).eval()


def _tied_config(family):
    config = causal_config(family)
    config.tie_word_embeddings = True  # SmolLM2-style: lm_head is the input embedding
    return config


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (2, 12), generator=gen)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_qlora_equals_dense_load_quantized_afterwards(tmp_path, family):
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(_tied_config(family)).eval()
    shards = _save_sharded(dense, tmp_path)
    ours = lora.load_streamed(_skeleton(dense.config), shards, quantize=QLORA)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    lora.quantize_model(ref, skip=QLORA.skip, double_quant=True)
    head, embed = ours.get_output_embeddings(), ours.get_input_embeddings()
    assert head.weight is embed.weight  # re-tied, not a random head
    assert torch.equal(head.weight, dense.get_input_embeddings().weight)
    n_nf4 = sum(isinstance(m, NF4Linear) for m in ours.modules())
    assert n_nf4 == sum(isinstance(m, NF4Linear) for m in ref.modules()) > 0
    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    assert sd_o.keys() == sd_r.keys()
    for k in sd_o:
        assert torch.equal(sd_o[k], sd_r[k]), k
    ids = _batch()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss)


def test_gpt2_conv1d_weights_are_transposed_before_quantizing(tmp_path):
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(causal_config("gpt2")).eval()
    shards = _save_sharded(dense, tmp_path)
    ours = lora.load_streamed(_skeleton(dense.config), shards, quantize=QLORA)
    conv, layer = dense.transformer.h[0].attn.c_attn, ours.transformer.h[0].attn.c_attn
    assert isinstance(layer, NF4Linear) and (layer.in_features, layer.out_features) == tuple(conv.weight.shape)
    packed, state = lora.quantize_nf4(conv.weight.detach().t().contiguous(), 64, True)
    assert torch.equal(layer.weight.view(torch.uint8), packed.view(torch.uint8))
    x = torch.randn(3, conv.weight.shape[0])
    with torch.no_grad():
        want, got = conv(x), layer(x)
    assert (got - want).norm() < 0.3 * want.norm()  # 4-bit error only; a wrong layout is ~1.4x


@pytest.mark.parametrize("stored,dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
def test_dense_stream_equals_from_pretrained_in_each_dtype(tmp_path, stored, dtype):
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(causal_config("llama")).eval()
    shards = _save_sharded(dense, tmp_path, stored)
    ours = lora.load_streamed(_skeleton(dense.config, dtype=dtype), shards, dtype=dtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    assert {p.dtype for p in ours.parameters()} == {dtype}
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(ref.named_buffers(), ours.buffers()):  # rotary inv_freq rebuilt alike
        assert torch.equal(a, b), k
    ids = _batch()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def test_bert_base_checkpoint_into_a_classifier_with_a_new_head(tmp_path):
    torch.manual_seed(0)
    base = transformers.BertModel(bert_config(), add_pooling_layer=True).eval()
    shards = _save_sharded(base, tmp_path)  # keys without the "bert." prefix, no classifier
    auto = transformers.AutoModelForSequenceClassification
    ours = lora.load_streamed(_skeleton(bert_config(num_labels=2), auto), shards,
                              quantize=lora.NF4Config(skip=("classifier",)), new_modules=("classifier",))
    assert isinstance(ours.bert.encoder.layer[0].attention.self.query, NF4Linear)
    assert type(ours.classifier) is torch.nn.Linear and not ours.classifier.weight.is_meta
    assert torch.equal(ours.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)
    assert torch.equal(ours.bert.embeddings.position_ids, base.embeddings.position_ids)


def test_tied_weights_stored_with_different_values_are_an_error(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(_tied_config("llama"))
    tensors = {k: v.clone().contiguous() for k, v in dense.state_dict().items()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="ties .*lm_head.weight.* different values"):
        lora.load_streamed(_skeleton(dense.config), tmp_path / "model.safetensors", quantize=QLORA)


def test_a_tensor_in_two_shards_and_a_missing_file_are_errors(tmp_path):
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match="'a' is in both"):
        lora.TensorFiles([tmp_path / "x.safetensors", tmp_path / "y.safetensors"])
    with pytest.raises(FileNotFoundError, match="nothing.safetensors does not exist"):
        lora.TensorFiles(tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="blocksize=63"):
        lora.NF4Config(blocksize=63)


# ------------------------------------------------------------------ transformers' save_pretrained
@pytest.mark.parametrize("quantized", [False, True])
def test_hf_save_pretrained_refuses_an_adapted_model_and_points_to_save_lora(tmp_path, quantized):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(causal_config("llama"))
    if quantized:
        lora.quantize_model(model)
        with pytest.raises(RuntimeError, match="save_quantized"):
            model.save_pretrained(tmp_path / "q")
    lora.add_lora(model, lora.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(RuntimeError, match=r"base_layer.weight.*lora.save_lora"):
        model.save_pretrained(tmp_path / "full")
    assert not (tmp_path / "full").exists()
    lora.save_lora(model, tmp_path / "adapter")  # the supported way still works


def test_hf_save_pretrained_after_merging_reloads_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(causal_config("llama")).eval()
    lora.add_lora(model, lora.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)  # a trained, non-zero update
    ids = _batch()
    with torch.no_grad():
        adapted = model(ids).logits
    lora.remove_lora(model, merge=True)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=1e-5, rtol=1e-5)
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_dequantized_plain_model_saves_again(tmp_path):
    model = tiny_bert_classifier(num_labels=2)
    lora.quantize_model(model, skip=("classifier",))
    lora.dequantize_model(model, torch.float32)
    model.save_pretrained(tmp_path)  # plain again: no refusal
    assert (tmp_path / "model.safetensors").is_file()
