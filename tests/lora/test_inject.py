"""Surgery rules: target matching and defaults, errors that leave the model unchanged, heads."""
from __future__ import annotations

import pytest
import torch

from lora import DEFAULT_TARGETS, LoRAConfig, TrainedCopy, add_lora, lora_parameters, remove_lora
from lora.targets import is_linear_like, resolve_targets

from .conftest import FAMILIES, assert_unchanged, snapshot, base_model, our_config

REQUIRED_TYPES = ("llama", "mistral", "qwen2", "opt", "gpt2", "bloom", "bert", "gpt_neox", "falcon", "phi")


def test_registry_defaults_are_peft_defaults() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
    assert set(REQUIRED_TYPES) <= set(DEFAULT_TARGETS)
    for model_type, names in DEFAULT_TARGETS.items():
        assert list(names) == PEFT_DEFAULTS[model_type], model_type


def _peft_targets(model, spec) -> set[str]:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    pm = get_peft_model(model, LoraConfig(target_modules=spec, task_type="SEQ_CLS" if hasattr(model, "classifier")
                                          else "CAUSAL_LM"))
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("spec", [None, "all-linear", r".*\.(query|value|v_proj|c_fc|dense_h_to_4h|fc1)",
                                  ["attention.self.key", "k_proj", "mlp.c_proj", "dense"]])
@pytest.mark.parametrize("family", FAMILIES)
def test_matching_equals_peft(family: str, spec) -> None:
    """None (registry), "all-linear", a regex and dotted suffixes select exactly peft's modules."""
    model = base_model(family)
    cfg = LoRAConfig(target_modules=spec)
    try:
        ours = set(resolve_targets(model, cfg.target_modules))
    except ValueError:
        with pytest.raises(ValueError):
            _peft_targets(model, spec)
        return
    assert ours == _peft_targets(model, spec)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_bad_inputs_raise_and_leave_model_unchanged(family: str) -> None:
    model = base_model(family)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="matched no module; the modules LoRA can wrap are") as err:
        add_lora(model, LoRAConfig(target_modules=["nope_proj"]))
    some_linear = next(n for n, m in model.named_modules() if is_linear_like(m))
    assert some_linear in str(err.value)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="cannot wrap"):
        add_lora(model, LoRAConfig(target_modules=[next(n for n, _ in model.named_children())]))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="modules_to_save entry 'head_x'"):
        add_lora(model, LoRAConfig(target_modules="all-linear", modules_to_save=("head_x",)))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="r=0"):
        add_lora(model, LoRAConfig(r=0))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        remove_lora(model)

    add_lora(model, our_config(family))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, our_config(family))
    modules, params = snap
    assert all(m is modules[n] for n, m in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {n: v[1] for n, v in params.items()}


def test_unknown_model_type_needs_targets() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no default LoRA targets"):
        add_lora(model, LoRAConfig())


def test_heads_train_as_copies_and_originals_return() -> None:
    model = base_model("bert")
    head = model.classifier
    add_lora(model, LoRAConfig(modules_to_save=("classifier",)))
    assert isinstance(model.classifier, TrainedCopy) and model.classifier.original is head
    assert model.classifier.weight is model.classifier.trained.weight  # attribute reads reach the copy
    trained = {id(p) for p in lora_parameters(model)}
    assert all(id(p) in trained for p in model.classifier.trained.parameters())
    assert not any(p.requires_grad for p in head.parameters())
    with torch.no_grad():
        model.classifier.trained.weight.add_(1.0)
    remove_lora(model)
    assert model.classifier is head and head.weight.requires_grad


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_options_train_like_peft(bias: str) -> None:
    from peft import LoraConfig, get_peft_model
    ours, ref = base_model("bert"), base_model("bert")
    add_lora(ours, LoRAConfig(bias=bias, modules_to_save=("classifier",)))
    pm = get_peft_model(ref, LoraConfig(bias=bias, task_type="SEQ_CLS"))
    mine = {n for n, p in ours.named_parameters() if p.requires_grad and n.endswith("bias")}
    theirs = {n.removeprefix("base_model.model.") for n, p in pm.named_parameters()
              if p.requires_grad and n.endswith("bias") and "modules_to_save" not in n
              and "original_module" not in n}
    mine = {n for n in mine if not n.startswith("classifier.")}
    assert mine == theirs and mine
