"""Write the AdapterHub reference that tests/lora/test_bottleneck.py holds lora.bottleneck to.

AdapterHub's ``adapters`` 1.3.0 needs transformers ~= 4.57, so it cannot run beside the test
stack (transformers 5.23). This script builds a separate virtual environment with it and, inside
that environment, writes ``tests/lora/reference/``:

- ``manifest.json``: versions, the tiny model configs (constructor kwargs), the inputs, and for
  each case its model, the AdapterHub config and the names of its files;
- ``<model>.safetensors``: the base weights (``state_dict`` of the 4.57 model, fp32);
- ``<case>/adapter.safetensors`` + ``<case>/adapter_config.json``: the adapter as AdapterHub's
  ``model.save_adapter(..., use_safetensors=True)`` writes it (weights randomized first, so
  every tensor matters, including layer norms and learned scalings). AdapterHub's safetensors
  save refuses ``ln_before=True`` (that norm is registered twice, as ``adapter_norm_before`` and
  ``adapter_down.0``); for such a case the script writes the same keys the pickle file would
  hold, each as its own copy;
- ``<case>/expected.safetensors``: AdapterHub's output (``output``), the base model's output
  without adapters (``base_output``), and the gradient of ``loss`` (see ``_loss``) with respect to
  every adapter tensor (``grad.<AdapterHub key>``), and the adapter's initial weights right after
  ``torch.manual_seed(INIT_SEED); model.add_adapter(...)`` (``init.<AdapterHub key>``); all in
  eval mode, eager attention, fp32; then ``STEPS`` AdamW steps on ``loss`` from the saved
  weights: the losses before each step (``losses``) and the final weights (``trained.<key>``).

Regenerate (from the repository root, any Python >= 3.9; PyPI must be reachable, the first run
takes a few minutes)::

    python tests/lora/make_bottleneck_reference.py            # venv in ~/.cache/purepeft/venv-adapters
    python tests/lora/make_bottleneck_reference.py --venv DIR

The venv gets ``torch==2.13.0`` first (the CPU build on this machine's local wheel index), then
``adapters==1.3.0`` and the transformers it pins. Re-running rewrites the same files bitwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "reference"
DEFAULT_VENV = Path.home() / ".cache" / "purepeft" / "venv-adapters"
PINS = ("torch==2.13.0", "adapters==1.3.0", "safetensors")

# tiny models: hidden 16, 2 layers, vocab 64 (keeps every file a few tens of kB)
MODELS = {
    "bert": ("BertConfig", "BertModel", dict(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=32, type_vocab_size=2, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "roberta": ("RobertaConfig", "RobertaModel", dict(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=34, type_vocab_size=1, pad_token_id=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)),
}

# case -> (model, AdapterHub config class, overrides); reduction 4 gives a bottleneck of 4
_FLAGS_POST_LN = dict(reduction_factor={"0": 2, "default": 8}, non_linearity="gelu", ln_before=True,
                      ln_after=True, adapter_residual_before_ln=True, residual_before_ln="post_add",
                      scaling="learned")
_FLAGS_PRE_LN = dict(reduction_factor=4, non_linearity="tanh", residual_before_ln=False, ln_after=True,
                     scaling="channel", leave_out=[0])
CASES = {
    "bert_houlsby": ("bert", "DoubleSeqBnConfig", dict(reduction_factor=4)),
    "bert_pfeiffer": ("bert", "SeqBnConfig", dict(reduction_factor=4)),
    "bert_pfeiffer_flags": ("bert", "SeqBnConfig", _FLAGS_POST_LN),
    "gpt2_houlsby": ("gpt2", "DoubleSeqBnConfig", dict(reduction_factor=4)),
    "gpt2_pfeiffer": ("gpt2", "SeqBnConfig", dict(reduction_factor=4)),
    "gpt2_houlsby_flags": ("gpt2", "DoubleSeqBnConfig", _FLAGS_PRE_LN),
    "llama_houlsby": ("llama", "DoubleSeqBnConfig", dict(reduction_factor=4)),
    "llama_pfeiffer": ("llama", "SeqBnConfig", dict(reduction_factor=4)),
    "llama_pfeiffer_flags": ("llama", "SeqBnConfig", dict(reduction_factor=4, residual_before_ln=False,
                                                          ln_before=True, scaling=0.5, non_linearity="leakyrelu")),
    "roberta_houlsby": ("roberta", "DoubleSeqBnConfig", dict(reduction_factor=4)),
    "roberta_pfeiffer": ("roberta", "SeqBnConfig", dict(reduction_factor=4)),
    "mistral_houlsby": ("mistral", "DoubleSeqBnConfig", dict(reduction_factor=4)),
    "mistral_pfeiffer": ("mistral", "SeqBnConfig", dict(reduction_factor=4)),
}

INIT_SEED = 7  # torch.manual_seed right before add_adapter: its initial weights are stored too
STEPS, STEPS_LR = 5, 1e-2  # AdamW steps (eval mode, default betas / weight decay) from the saved weights

# two rows, the second right-padded by 2
INPUT_IDS = [[5, 17, 33, 9, 41, 12, 60], [7, 22, 3, 58, 14, 0, 0]]
ATTENTION_MASK = [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]


def _loss(output, mask):
    """The scalar whose adapter gradients are stored. Not a plain mean square: after BERT's final
    LayerNorm (weight 1, bias 0) that is ~1 whatever the adapter does. Each real position's
    features are weighted by linspace(-1, 1) and summed, and those sums are squared and averaged."""
    import torch
    weights = torch.linspace(-1.0, 1.0, output.shape[-1])
    return (output[mask.bool()] * weights).sum(-1).pow(2).mean()


def build_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [PINS[0]], check=True)  # torch first: the local CPU wheel, not a CUDA build
    subprocess.run(pip + list(PINS[1:]), check=True)
    return python


def _inside() -> None:
    """Runs in the adapters venv: build each case and write its files."""
    import adapters
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    ids, mask = torch.tensor(INPUT_IDS), torch.tensor(ATTENTION_MASK)
    OUT.mkdir(exist_ok=True)
    manifest = {"adapters": adapters.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__, "input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
                "loss": "(output[attention_mask.bool()] * torch.linspace(-1, 1, output.shape[-1])).sum(-1).pow(2).mean()",
                "init_seed": INIT_SEED, "steps": STEPS, "steps_lr": STEPS_LR, "models": {}, "cases": {}}

    def fresh(name):
        config_cls, model_cls, kwargs = MODELS[name]
        config = getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")
        torch.manual_seed(0)
        return getattr(transformers, model_cls)(config).eval()

    def run(model):
        out = model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits

    for name, (config_cls, model_cls, kwargs) in MODELS.items():
        model = fresh(name)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(OUT / f"{name}.safetensors"), metadata={"format": "pt"})
        manifest["models"][name] = {"config_class": config_cls, "model_class": model_cls, "config": kwargs,
                                    "weights": f"{name}.safetensors"}

    for case, (name, config_name, overrides) in CASES.items():
        model = fresh(name)
        with torch.no_grad():
            base_output = run(model).clone()
        adapters.init(model)
        config = getattr(adapters, config_name)(**overrides)
        torch.manual_seed(INIT_SEED)
        model.add_adapter(case, config=config)
        model.train_adapter(case)
        model.eval()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        init = {f"init.{n}": p.detach().clone() for n, p in params.items()}
        gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():  # every tensor non-trivial: norms around 1, the rest around 0
            for n in sorted(params):
                noise = torch.randn(params[n].shape, generator=gen) * 0.3
                is_norm = "norm" in n or n.endswith("scaling")
                params[n].copy_(1.0 + noise if is_norm else noise)
        output = run(model)
        model.zero_grad()
        _loss(output, mask).backward()
        folder = OUT / case
        try:
            model.save_adapter(str(folder), case, use_safetensors=True)
        except RuntimeError:  # ln_before: AdapterHub registers that norm twice, its safetensors save refuses
            model.save_adapter(str(folder), case, use_safetensors=False)
            (folder / "pytorch_adapter.bin").unlink()
            own = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                   if f".adapters.{case}." in k}  # the .bin's keys, each its own copy
            save_file(own, str(folder / "adapter.safetensors"))
        for extra in ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin"):
            (folder / extra).unlink(missing_ok=True)  # the static LM head: the base's own weights
        expected = {"output": output.detach().clone(), "base_output": base_output, **init}
        expected.update({f"grad.{n}": p.grad.detach().clone() for n, p in params.items()})
        opt = torch.optim.AdamW(list(params.values()), lr=STEPS_LR)  # a few steps from the saved weights
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = _loss(run(model), mask)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        expected["losses"] = torch.stack(losses)
        expected.update({f"trained.{n}": p.detach().clone() for n, p in params.items()})
        save_file(expected, str(folder / "expected.safetensors"), metadata={"format": "pt"})
        manifest["cases"][case] = {"model": name, "config_class": config_name,
                                   "overrides": overrides, "folder": case}

    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} kB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where to build the adapters venv")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        _inside()
        return
    python = build_venv(args.venv)
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run([str(python), str(Path(__file__).resolve()), "--inside"], check=True, env=env)


if __name__ == "__main__":
    main()
