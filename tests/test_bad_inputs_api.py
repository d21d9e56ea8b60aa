"""Table-driven faults through the library API (lora, softprompt, train).

Each case builds a bad input under ``tmp_path`` and expects an exception whose message matches
the case's pattern (naming the bad value, field or file), and that neither the files under
``tmp_path`` nor the model handed in changed (state dict bitwise, same module types).
"""
from __future__ import annotations

import errno
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora import LoRAConfig, add_lora, load_lora, merge_lora, save_lora
from softprompt import PromptConfig, PromptModel, load_prompt, save_prompt
from softprompt.generate import decode
from tests.cli_folders import snapshot
from tests.models import tiny_bert_classifier, tiny_causal_lm, tiny_classifier
from train import adapters
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import LoopConfig, ModelConfig, RunConfig
from train.data import read_records
from train.loop import resolve_device
from train.plot import read_metrics

W, C, P = "adapter_model.safetensors", "adapter_config.json", "softprompt_config.json"


def _lora_folder(t):
    model = add_lora(tiny_causal_lm("llama"), LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    return save_lora(model, t / "lora")


def _prompt_folder(t, method="prompt"):
    pm = PromptModel(tiny_causal_lm("llama"), PromptConfig(method=method, n_virtual=4))
    save_prompt(pm, t / "prompt")
    return t / "prompt"


def _edit(path, **changes):
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _lora_config_case(**changes):
    def setup(t):
        folder = _lora_folder(t)
        _edit(folder / C, **changes)
        model = tiny_causal_lm("llama")
        return (lambda: load_lora(model, folder)), model
    return setup


def _lora_tensor_case(edit):
    def setup(t):
        folder = _lora_folder(t)
        save_file(edit(load_file(folder / W)), folder / W)
        model = tiny_causal_lm("llama")
        return (lambda: load_lora(model, folder)), model
    return setup


def _nan(tensors):
    return {k: torch.full_like(v, math.nan) for k, v in tensors.items()}


def _one_inf(tensors):
    key = sorted(tensors)[0]
    bad = tensors[key].clone()
    bad.view(-1)[0] = math.inf
    return {**tensors, key: bad}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _merged(t):
    folder = _lora_folder(t)
    model = load_lora(tiny_causal_lm("llama"), folder)
    merge_lora(model)
    return (lambda: load_lora(model, folder)), model


def _lora_truncated(t):
    folder = _lora_folder(t)
    _truncate(folder / W)
    model = tiny_causal_lm("llama")
    return (lambda: load_lora(model, folder)), model


def _prompt_case(corrupt, method="prompt"):
    def setup(t):
        folder = _prompt_folder(t, method)
        corrupt(folder)
        backbone = tiny_causal_lm("llama")
        return (lambda: load_prompt(backbone, folder)), backbone
    return setup


def _peft_only(folder):
    (folder / P).unlink()
    _edit(folder / C, num_virtual_tokens="4")


def _all_padding(t):
    backbone = tiny_causal_lm("llama")
    ids = torch.tensor([[5, 6, 7], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    return (lambda: decode(backbone, torch.zeros(2, 16), ids, mask, 2)), backbone


def _right_padded_decoder_classifier(t):
    pm = PromptModel(tiny_classifier("llama", num_labels=2), PromptConfig(n_virtual=4), task="seq_cls")
    ids, mask = torch.tensor([[5, 6, 7], [5, 6, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    return (lambda: pm(input_ids=ids, attention_mask=mask)), pm


def _checkpoint_case(corrupt):
    def setup(t):
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        folder = save_checkpoint(t, 1, model, opt, None, {})
        corrupt(folder)
        fresh = torch.nn.Linear(3, 2)
        return (lambda: load_checkpoint(folder, fresh, torch.optim.AdamW(fresh.parameters(), lr=0.1))), fresh
    return setup


def _head_nan(t):
    model = adapters.build_adapted(tiny_bert_classifier(num_labels=2), ModelConfig(method="head"), "seq_cls")
    adapters.save_adapted(model, "head", t / "head")
    save_file(_nan(load_file(t / "head" / "head_model.safetensors")), t / "head" / "head_model.safetensors")
    fresh = tiny_bert_classifier(num_labels=2)
    return (lambda: adapters.load_adapted(fresh, "head", t / "head")), fresh


def _file(name, content: bytes, call):
    def setup(t):
        (t / name).write_bytes(content)
        return (lambda: call(t / name)), None
    return setup


def _call(thunk):
    return lambda t: (thunk, None)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# (id, class, setup(tmp) -> (call, model or None), exception type, pattern)
CASES = [
    ("lora-into-merged-model", "wrong-result", _merged, ValueError, r"LoRA is merged .* call unmerge_lora"),
    ("lora-rslora-string-false", "wrong-result", _lora_config_case(use_rslora="false"), ValueError,
     r"adapter_config\.json: wrong value type\(s\): use_rslora='false' \(a JSON string, expected boolean\)"),
    ("lora-dora-string-no", "wrong-result", _lora_config_case(use_dora="no"), ValueError, r"use_dora='no'"),
    ("lora-rslora-int", "wrong-result", _lora_config_case(use_rslora=1), ValueError, r"use_rslora=1 \(a JSON integer"),
    ("lora-r-string", "wrong-result", _lora_config_case(r="8"), ValueError, r"r='8' \(a JSON string, expected integer\)"),
    ("lora-r-float", "wrong-result", _lora_config_case(r=4.0), ValueError, r"r=4\.0 \(a JSON number"),
    ("lora-alpha-bool", "wrong-result", _lora_config_case(lora_alpha=True), ValueError, r"lora_alpha=True"),
    ("lora-dropout-string", "wrong-result", _lora_config_case(lora_dropout="0.1"), ValueError, r"lora_dropout='0\.1'"),
    ("lora-targets-ints", "wrong-result", _lora_config_case(target_modules=[1, 2]), ValueError,
     r"target_modules=\[1, 2\] \(expected a list of strings\)"),
    ("lora-heads-string", "wrong-result", _lora_config_case(modules_to_save="classifier"), ValueError,
     r"modules_to_save='classifier'"),
    ("lora-fan-in-string", "wrong-result", _lora_config_case(fan_in_fan_out="false"), ValueError,
     r"fan_in_fan_out='false'"),
    ("lora-bias-int", "wrong-result", _lora_config_case(bias=0), ValueError, r"bias=0"),
    ("lora-bias-unknown", "wrong-result", _lora_config_case(bias="some"), ValueError,
     r"adapter_config\.json: LoRAConfig\.bias='some'"),
    ("lora-peft-type", "wrong-result", _lora_config_case(peft_type="PROMPT_TUNING"), ValueError, r"peft_type='PROMPT_TUNING'"),
    ("lora-nan", "wrong-result", _lora_tensor_case(_nan), ValueError,
     r"lora/adapter_model\.safetensors: tensor\(s\) .* hold NaN or infinite values"),
    ("lora-one-inf", "wrong-result", _lora_tensor_case(_one_inf), ValueError, r"hold NaN or infinite"),
    ("lora-truncated", "traceback", _lora_truncated, ValueError, r"adapter_model\.safetensors is not a readable"),
    ("lora-missing-folder", "traceback", lambda t: ((lambda: load_lora(tiny_causal_lm("llama"), t / "none")), None),
     FileNotFoundError, r"none does not exist"),
    ("prompt-bad-json", "traceback", _prompt_case(lambda f: (f / C).write_text("{")), ValueError,
     r"prompt/adapter_config\.json is not valid JSON"),
    ("prompt-truncated", "traceback", _prompt_case(lambda f: _truncate(f / W)), ValueError,
     r"prompt/adapter_model\.safetensors is not a readable safetensors file"),
    ("prompt-missing-weights", "traceback", _prompt_case(lambda f: (f / W).unlink()), FileNotFoundError,
     r"prompt has no adapter_model\.safetensors"),
    ("prompt-missing-config-key", "traceback", _prompt_case(lambda f: (f / P).write_text('{"task": "causal_lm"}')),
     ValueError, r"softprompt_config\.json: missing or malformed key\(s\) \['config'\]"),
    ("prompt-missing-task-key", "traceback", _prompt_case(lambda f: _edit(f / P, task=None) or
                                                         (f / P).write_text(json.dumps({"config": {}}))),
     ValueError, r"softprompt_config\.json: missing or malformed key\(s\) \['task'\]"),
    ("prompt-our-config-type", "wrong-result",
     _prompt_case(lambda f: _edit(f / P, config={**json.loads((f / P).read_text())["config"], "truncate_init_text": "no"})),
     ValueError, r"softprompt_config\.json: truncate_init_text='no'; expected a bool"),
    ("prompt-peft-n-virtual-string", "wrong-result", _prompt_case(_peft_only), ValueError,
     r"adapter_config\.json: wrong value type\(s\) \[\"num_virtual_tokens='4'\"\]"),
    ("prompt-token-dim-bool", "wrong-result", _prompt_case(lambda f: _edit(f / C, token_dim=True)), ValueError,
     r"token_dim=True"),
    ("prompt-nan", "wrong-result", _prompt_case(lambda f: save_file(_nan(load_file(f / W)), f / W)), ValueError,
     r"prompt/adapter_model\.safetensors: tensor\(s\) \['prompt_embeddings'\] hold NaN"),
    ("prompt-no-embeddings", "traceback",
     _prompt_case(lambda f: save_file({"x": torch.zeros(1)}, f / W)), ValueError, r"missing key 'prompt_embeddings'"),
    ("prompt-missing-folder", "traceback",
     lambda t: ((lambda: load_prompt(tiny_causal_lm("llama"), t / "none")), None), FileNotFoundError,
     r"none does not exist"),
    ("head-nan", "wrong-result", _head_nan, ValueError, r"head_model\.safetensors: tensor\(s\) .* hold NaN"),
    ("generate-all-padding-row", "traceback", _all_padding, ValueError, r"attention_mask rows \[1\] are all padding"),
    ("decoder-classifier-right-padded", "wrong-result", _right_padded_decoder_classifier, ValueError,
     r"decoder classifier .* right-padded .* pad on the left"),
    ("data-latin1", "traceback", _file("l.csv", b"text,label\ncaf\xe9,1\n", read_records), ValueError,
     r"l\.csv:2: byte b'\\xe9' at offset 14 is not UTF-8"),
    ("metrics-corrupt-middle", "traceback",
     _file("m.jsonl", b'{"step": 1}\n{bad\n{"step": 3}\n', read_metrics), ValueError, r"m\.jsonl:2: not valid JSON"),
    ("checkpoint-truncated", "traceback", _checkpoint_case(lambda f: _truncate(f / "trainable.safetensors")),
     ValueError, r"trainable\.safetensors is not a readable safetensors file"),
    ("checkpoint-state-corrupt", "traceback", _checkpoint_case(lambda f: (f / "state.json").write_text("{")),
     ValueError, r"state\.json is not valid JSON"),
    ("config-prompt-bool-string", "config", _call(lambda: PromptConfig(truncate_init_text="yes")), ValueError,
     r"truncate_init_text='yes'; expected a bool"),
    ("config-model-int-string", "config", _call(lambda: ModelConfig(lora_r="8")), ValueError, r"lora_r='8' \(str\)"),
    ("config-loop-bool-string", "config", _call(lambda: LoopConfig(progress="yes")), ValueError, r"progress='yes'"),
    ("config-section-list", "config", _call(lambda: RunConfig.from_dict({"model": []})), ValueError,
     r"config section 'model' is \[\] \(list\)"),
    ("config-ptuning-ignores-lora", "option", _call(lambda: ModelConfig(method="ptuning", lora_alpha=16.0)),
     ValueError, r"lora_alpha=16\.0 is only used by method lora or qlora"),
    ("device-cuda", "device", _call(lambda: resolve_device("cuda")), ValueError, r"--device cuda: CUDA is not available"),
]
CASES = [pytest.param(*c, id=c[0], marks=[NO_CUDA] if c[1] == "device" else []) for c in CASES]


@pytest.mark.parametrize("name,kind,setup,error,pattern", CASES)
def test_bad_api_input_raises_clearly_and_changes_nothing(tmp_path, name, kind, setup, error, pattern):
    call, model = setup(tmp_path)
    before = snapshot(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()} if model is not None else {}
    types = [type(m) for m in model.modules()] if model is not None else []
    with pytest.raises(error) as info:
        call()
    assert re.search(pattern, str(info.value)), str(info.value)
    assert snapshot(tmp_path) == before
    if model is not None:
        now = model.state_dict()
        assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
        assert [type(m) for m in model.modules()] == types


def test_check_finite_false_is_the_explicit_opt_out(tmp_path):
    folder = _lora_folder(tmp_path)
    save_file(_nan(load_file(folder / W)), folder / W)
    model = load_lora(tiny_causal_lm("llama"), folder, check_finite=False)
    assert any(torch.isnan(p).all() for n, p in model.named_parameters() if "lora_" in n)
    pfolder = _prompt_folder(tmp_path)
    save_file(_nan(load_file(pfolder / W)), pfolder / W)
    assert torch.isnan(load_prompt(tiny_causal_lm("llama"), pfolder, check_finite=False).prompt()).all()


def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import train.checkpoint as ck
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    first = save_checkpoint(tmp_path, 1, model, opt, None, {})
    before = snapshot(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(ck.CheckpointWriteError, match=r"step 2 .*No space left on device; the previous checkpoint "
                                                      r"is intact: .*step-00000001"):
        save_checkpoint(tmp_path, 2, model, opt, None, {})
    assert snapshot(tmp_path) == before  # no temp folder left, latest.json still names step 1
    assert ck.latest_checkpoint(tmp_path) == first
