"""Every library option reaches the model through `python -m train` flags, and a finished run's
config.json reruns it exactly."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lora import IA3Layer, LoRAEmbedding, LoRALinear, NF4Linear, TrainedCopy
from tests.models import tiny_bert_classifier, tiny_causal_lm
from train.adapters import build_adapted
from train.cli import build_parser, config_from_args, main

from .test_cli import _train, folders  # noqa: F401  (the module-scoped tiny folders)


def _build(*flags, family="llama"):
    args = build_parser().parse_args(["train", *flags])
    cfg = config_from_args(args)
    model = tiny_bert_classifier(num_labels=2) if family == "bert" else tiny_causal_lm(family)
    return cfg, build_adapted(model, cfg.model, "seq_cls" if family == "bert" else "causal_lm")


def _layers(model, kind):
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def test_lora_variant_flags():
    _, model = _build("--use-dora", "--lora-r", "4")
    assert all(m.use_dora and m.lora_magnitude_vector is not None for m in _layers(model, LoRALinear).values())
    _, model = _build("--use-rslora", "--lora-r", "4", "--lora-alpha", "8")
    assert {m.scaling for m in _layers(model, LoRALinear).values()} == {8 / math.sqrt(4)}
    _, model = _build("--train-bias", "all", family="bert")
    assert any(n.endswith("bias") and p.requires_grad for n, p in model.named_parameters())


def test_target_modules_all_linear_regex_and_embedding():
    _, model = _build("--target-modules", "all-linear")
    linear = [n for n, m in tiny_causal_lm("llama").named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(_layers(model, LoRALinear)) == sorted(n for n in linear if n != "lm_head")
    _, model = _build("--target-modules", r"model\.layers\.0\..*_proj")
    assert sorted(_layers(model, LoRALinear)) == sorted(n for n in linear if n.startswith("model.layers.0."))
    _, model = _build("--target-modules", "embed_tokens", "q_proj")
    assert list(_layers(model, LoRAEmbedding)) == ["model.embed_tokens"]


def test_patterns_layers_and_modules_to_save():
    _, model = _build("--target-modules", "q_proj", "v_proj", "--rank-pattern", "v_proj=2",
                      "--alpha-pattern", r"layers\.1\..*=3", "--layers-to-transform", "1", "--layers-pattern", "layers",
                      "--modules-to-save", "lm_head")
    layers = _layers(model, LoRALinear)
    assert sorted(layers) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert layers["model.layers.1.self_attn.v_proj"].r == 2 and layers["model.layers.1.self_attn.q_proj"].r == 8
    assert {m.alpha for m in layers.values()} == {3.0}
    assert isinstance(model.lm_head, TrainedCopy)


def test_nf4_flags():
    _, model = _build("--method", "qlora", "--nf4-blocksize", "128", "--no-nf4-double-quant",
                      "--nf4-compute-dtype", "bf16", "--nf4-skip", "lm_head", "down_proj", "--nf4-quant-type", "fp4")
    nf4 = _layers(model, NF4Linear)
    assert nf4 and all(m.state.blocksize == 128 and not m.state.double_quant and m.compute_dtype == torch.bfloat16
                       and m.state.quant_type == "fp4" for m in nf4.values())
    assert not any(n.endswith("down_proj") for n in nf4)
    _, model = _build("--method", "qlora")  # defaults: blocks of 64, double quant, compute in the input dtype
    assert all(m.state.blocksize == 64 and m.state.double_quant and m.compute_dtype is None
               and m.state.quant_type == "nf4" for m in _layers(model, NF4Linear).values())


def test_ia3_flags():
    _, model = _build("--method", "ia3")
    ia3 = _layers(model, IA3Layer)
    assert sorted({n.rsplit(".", 1)[1] for n in ia3}) == ["down_proj", "k_proj", "v_proj"]
    assert {n for n, m in ia3.items() if m.is_feedforward} == {n for n in ia3 if n.endswith("down_proj")}
    _, model = _build("--method", "ia3", "--target-modules", "q_proj", "up_proj", "--feedforward-modules", "up_proj")
    ia3 = _layers(model, IA3Layer)
    assert sorted({n.rsplit(".", 1)[1] for n in ia3}) == ["q_proj", "up_proj"]
    assert {n for n, m in ia3.items() if m.is_feedforward} == {n for n in ia3 if n.endswith("up_proj")}


@pytest.mark.parametrize("flags,match", [
    (["--rank-pattern", "v_proj"], "rank_pattern entry 'v_proj'; expected REGEX=R"),
    (["--alpha-pattern", "v=x"], "alpha_pattern entry 'v=x'"),
    (["--layers-to-transform", "one"], "layers_to_transform entry 'one'"),
    (["--layers-pattern", "layers"], "layers_pattern='layers' needs layers_to_transform"),
    (["--train-bias", "some"], "train_bias='some'"),
    (["--nf4-blocksize", "100"], "nf4_blocksize=100"),
    (["--nf4-compute-dtype", "fp8"], "nf4_compute_dtype='fp8'"),
    (["--nf4-quant-type", "int4"], "nf4_quant_type='int4'"),
])
def test_bad_option_values(flags, match):
    with pytest.raises(ValueError, match=match):
        config_from_args(build_parser().parse_args(["train", *flags]))


def test_help_lists_the_new_flags():
    parser = build_parser()
    text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--use-dora", "--use-rslora", "--train-bias", "--rank-pattern", "--alpha-pattern",
                 "--layers-to-transform", "--layers-pattern", "--modules-to-save", "--feedforward-modules",
                 "--nf4-blocksize", "--no-nf4-double-quant", "--nf4-compute-dtype", "--nf4-skip", "--nf4-quant-type"):
        assert flag in text, flag
    assert "ia3" in text


def test_demo_has_an_ia3_row():
    from train.demo import demo_rows
    for full in (False, True):
        row = demo_rows(full)["ia3"]
        assert (row.model.method, row.model.model, row.data.task) == ("ia3", "minilm", "classify")


def test_demo_budget_lines_name_each_rows_steps_lr_precision_and_knobs():
    from train.demo import demo_rows, format_budget
    rows = demo_rows()
    lines = format_budget(rows).splitlines()
    assert len(lines) == len(rows)
    for line, (name, cfg) in zip(lines, rows.items()):
        assert line.startswith(f"- {name}: {cfg.loop.steps} steps of batch {cfg.loop.batch_size}, "
                               f"lr {cfg.lr:g}, {cfg.loop.precision}")
    assert rows["prompt"].loop.steps != rows["lora"].loop.steps  # per-row budgets reach the configs
    by_name = dict(zip(rows, lines))
    assert by_name["ptuning"].endswith("bf16, 20 virtual tokens, lstm encoder")  # the sweep's pick
    assert by_name["prompt"].endswith("bf16, 20 virtual tokens")
    assert by_name["lora"].endswith("bf16, r 8 alpha 8 on query+value")
    assert by_name["smollm2-lora"].endswith("r 8 alpha 16 on q_proj+v_proj")
    assert by_name["head"].endswith("bf16") and by_name["ia3"].endswith("bf16")


def test_ia3_trains_and_reloads_from_the_cli(folders, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ia3"
    assert _train(folders, out, "--model", str(folders / "tiny-bert"), "--data", str(folders / "reviews.csv"),
                  "--method", "ia3") == 0
    raw = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "IA3" and raw["modules_to_save"] == ["classifier"]
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == summary["after"]["accuracy"]


def test_qlora_nf4_options_survive_eval(folders, tmp_path, capsys):  # noqa: F811
    """eval rebuilds the 4-bit base with the run's NF4 options, so it scores what the run scored."""
    out = tmp_path / "qlora"
    assert _train(folders, out, "--model", str(folders / "tiny-llama"), "--data", str(folders / "chat.jsonl"),
                  "--method", "qlora", "--max-length", "32", "--nf4-blocksize", "128", "--no-nf4-double-quant") == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(summary["after"]["eval_loss"], abs=1e-6)


def test_rerun_from_a_finished_runs_config(folders, tmp_path):  # noqa: F811
    """--config runs/<run>/config.json (with its effective_lr) reruns the run: bitwise the same adapter."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert _train(folders, first, "--model", str(folders / "tiny-llama"), "--data", str(folders / "chat.jsonl"),
                  "--method", "lora", "--max-length", "32", "--use-rslora", "--target-modules", "all-linear") == 0
    saved = json.loads((first / "config.json").read_text())
    assert "effective_lr" in saved and saved["loop"]["lr"] is None
    assert main(["train", "--config", str(first / "config.json"), "--out", str(second)]) == 0
    a = load_file(first / "adapter" / "adapter_model.safetensors")
    b = load_file(second / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    rerun = json.loads((second / "config.json").read_text())
    assert rerun["loop"]["lr"] == saved["effective_lr"] and rerun["model"] == saved["model"]
