"""train/loss.py: the labelled-only causal-LM loss equals the model's own full-logits loss.

Each test computes the model's own ``forward(...).loss`` (Hugging Face's shifted cross-entropy
over all logits) and ours on the same model and batch, with gradients, in the same test.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lora import IA3Config, LoRAConfig, add_ia3, add_lora, quantize_model
from softprompt import PrefixConfig, PrefixModel, PromptConfig, PromptModel
from tests.models import VOCAB, tiny_causal_lm
from train import LoopConfig
from train.loss import batch_loss, labelled_loss
from train.loop import train

METHODS = ("lora", "qlora", "ia3", "prompt", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-projection")


def adapted(method: str, family: str = "llama") -> torch.nn.Module:
    backbone = tiny_causal_lm(family)
    torch.manual_seed(7)
    if method in ("lora", "qlora"):
        if method == "qlora":
            quantize_model(backbone, skip=("lm_head",), blocksize=64, double_quant=True,
                           compute_dtype=torch.float32)
        model = add_lora(backbone, LoRAConfig(r=4, alpha=8))
        for m in model.modules():  # B = 0 at init would hide the adapter's share of the gradient
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B.weight, std=0.1)
        return model
    if method == "ia3":
        model = add_ia3(backbone, IA3Config())
        with torch.no_grad():  # ones at init: move them so every vector's gradient differs
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        return model
    if method.startswith("prefix"):
        return PrefixModel(backbone, PrefixConfig(n_virtual=3, projection=method.endswith("projection")))
    kind, _, enc = method.partition("-")
    cfg = PromptConfig(method="prompt", n_virtual=3) if kind == "prompt" else \
        PromptConfig(method="ptuning", n_virtual=3, encoder=enc)
    return PromptModel(backbone, cfg)


def instruct_batch(b: int = 4, t: int = 12, answer: int = 3, seed: int = 0) -> dict:
    """Right-padded rows whose last ``answer`` real tokens are labelled (instruction shaped)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    labels = torch.full((b, t), -100)
    for row in range(b):
        n = t - row  # ragged lengths
        mask[row, n:] = 0
        labels[row, n - answer:n] = ids[row, n - answer:n]
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def loss_and_grads(model, fn, batch):
    torch.manual_seed(3)  # the same dropout masks for both losses
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def full(model, batch):
    return model(**batch).loss


def assert_same(model, batch, chunk_size=1024):
    ref, ref_grads = loss_and_grads(model, full, batch)
    ours, grads = loss_and_grads(model, lambda m, b: labelled_loss(m, b, chunk_size), batch)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk_size", [1024, 5], ids=["one-chunk", "chunked"])
def test_same_loss_and_grads_as_full_logits(method, chunk_size):
    model = adapted(method).train()
    assert_same(model, instruct_batch(), chunk_size)


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom"])
def test_other_families(family):
    assert_same(adapted("lora", family).train(), instruct_batch(seed=1), chunk_size=4)


def test_extra_batch_keys_pass_through():
    """Packed rows: position_ids restart inside a row and reach the model unchanged."""
    model = adapted("lora").train()
    batch = instruct_batch(b=2, t=10, answer=4)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]] * 2)
    assert_same(model, batch, chunk_size=3)
    plain = {k: v for k, v in batch.items() if k != "position_ids"}
    assert not torch.allclose(labelled_loss(model.eval(), plain), labelled_loss(model, batch))


def test_head_sees_at_most_one_chunk_of_rows():
    model = adapted("lora").train()
    batch = instruct_batch(b=4, t=12, answer=6)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    labelled_loss(model, batch, chunk_size=4).backward()
    hook.remove()
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert seen[0][:2] == (1, 1)  # the probe row inside the model's forward
    rows = [s[0] for s in seen[1:]]
    assert max(rows) <= 4 and sum(rows) == 2 * n  # each chunk runs once forward, once recomputed


def test_no_labelled_position_gives_zero_connected_to_the_graph():
    model = adapted("lora").train()
    batch = instruct_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = batch_loss(model, batch, "labelled")
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    full_zero = batch_loss(model, batch, "full")
    assert float(full_zero.detach()) == 0.0 and full_zero.requires_grad


def test_classification_labels_use_the_models_own_loss():
    from tests.models import tiny_bert_classifier
    model = tiny_bert_classifier(num_labels=3)
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 5)), "labels": torch.tensor([0, 2])}
    torch.testing.assert_close(batch_loss(model, batch, "labelled"), model(**batch).loss, rtol=0, atol=0)


def _tiny(config_cls, **kw):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     head_dim=4, **kw)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def test_softcapped_logits_are_honoured():
    model = _tiny(transformers.Gemma2Config, final_logit_softcapping=0.5)
    model = add_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    assert_same(model.train(), instruct_batch(), chunk_size=4)


def test_scaled_logits_are_honoured():
    model = _tiny(transformers.GraniteConfig, logits_scaling=4.0)
    model = add_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    assert_same(model.train(), instruct_batch(), chunk_size=4)


def test_unknown_logit_transform_is_refused():
    model = tiny_causal_lm("llama")

    def square(module, args, kwargs, out):
        out.logits = out.logits ** 2
        return out
    model.register_forward_hook(square, with_kwargs=True)
    with pytest.raises(ValueError, match="use loss mode 'full'"):
        labelled_loss(model, instruct_batch())


def test_bad_mode_and_chunk():
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="loss mode='fast'"):
        batch_loss(model, instruct_batch(), "fast")
    with pytest.raises(ValueError, match="chunk_size=0"):
        labelled_loss(model, instruct_batch(), chunk_size=0)
    with pytest.raises(ValueError, match="loss='fast'"):
        LoopConfig(loss="fast")


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_loop_trains_the_same_with_either_loss(method, tmp_path):
    """Three optimizer steps through train(): labelled and full end at the same adapter."""
    batch = instruct_batch(b=8, t=12)
    examples = [{k: v[i] for k, v in batch.items()} for i in range(8)]

    def collate(items):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
    finals = {}
    for mode in ("full", "labelled"):
        model = adapted(method)
        cfg = LoopConfig(steps=3, batch_size=4, lr=1e-2, loss=mode, loss_chunk=5, device="cpu",
                         progress=False, log_every=1)
        train(model, examples, collate, cfg, tmp_path / mode, 1e-2)
        finals[mode] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, value in finals["full"].items():
        torch.testing.assert_close(finals["labelled"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_cli_loss_flag(tmp_path):
    """`--loss full` and the default (labelled) train the same LoRA adapter through the CLI."""
    from tests.models import tiny_tokenizer
    from train.cli import main
    folder = tmp_path / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    items = [{"instruction": "Say hello", "input": t, "output": "hello world"}
             for t in ["the movie was great", "a dull , boring film", "wonderful acting", "far too long"] * 2]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    tensors = {}
    for mode in ("full", "labelled"):
        out = tmp_path / mode
        flags = ["--loss", mode] if mode == "full" else []
        assert main(["train", "--steps", "3", "--batch-size", "2", "--no-progress", "--out", str(out),
                     "--model", str(folder), "--data", str(data), "--method", "lora", "--max-length", "32",
                     "--lr", "0.01", "--device", "cpu", *flags]) == 0
        assert json.loads((out / "config.json").read_text())["loop"]["loss"] == mode
        tensors[mode] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors["full"].keys() == tensors["labelled"].keys()
    for key, value in tensors["full"].items():
        torch.testing.assert_close(tensors["labelled"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_bf16_autocast_agrees_to_bf16_rounding():
    model = adapted("lora").train()
    batch = instruct_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = loss_and_grads(model, full, batch)
        ours, grads = loss_and_grads(model, lambda m, b: labelled_loss(m, b, 5), batch)
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=5e-2, atol=5e-3, msg=name)
