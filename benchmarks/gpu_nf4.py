"""NF4 on a CUDA GPU: bit-exactness vs bitsandbytes' CUDA kernels, throughput, QLoRA step.

    python benchmarks/gpu_nf4.py [OUT.md]     # default OUT: docs/benchmarks_gpu_nf4.md

1. Exactness (rounding="cuda": exact nearest for the double-quant step, reciprocal scaling):
   packed bytes, absmax, double-quant codes/nested absmax vs ``bitsandbytes.functional.
   quantize_4bit`` on the GPU, and our dequantization of bitsandbytes' own bytes vs its
   ``dequantize_4bit``. Reported as mismatch counts (CUDA's fast-math reciprocal may flip a
   rare code sitting on a threshold), not asserted.
2. Throughput: dequantize 4096x4096 and an NF4 linear forward+backward (8 x 512 tokens, bf16).
3. Training step on a llama-shaped model built from a config (no hub): our QLoRA (NF4+DQ base,
   bf16 compute) vs bf16 LoRA vs peft + bitsandbytes QLoRA; time and peak memory.

Without CUDA every GPU part is skipped and a small CPU smoke check runs instead (< 1 min).
Total GPU runtime is kept under ~3 minutes (few repeats, one model size).
"""
from __future__ import annotations

import gc
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, header, markdown_table, median_ms, ratio, time_alternating  # noqa: E402

# ---------------------------------------------------------------------------------- knobs
EXACT_SHAPES = [(4096, 4096), (1000, 333), (64, 96), (11, 4097)]
EXACT_BLOCKSIZES = (32, 64, 256, 4096)
SIZE = 4096
TOKENS = (8, 512)
MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1024)
STEP_SHAPE = (8, 512)
REPEATS = 10


def _bnb():
    try:
        import bitsandbytes.functional as bnbF
        return bnbF
    except Exception:  # not installed or no kernels for this machine
        return None


def exactness(device: str) -> list[list[str]]:
    bnbF = _bnb()
    rows = []
    if bnbF is None:
        return [["bitsandbytes unavailable", "-", "-", "-", "-", "-"]]
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape in EXACT_SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(device)
            for bs in EXACT_BLOCKSIZES:
                for dq in (False, True):
                    label = f"{shape} {str(dtype)[6:]} bs{bs}{' DQ' if dq else ''}"
                    rows.append(_guard(lambda: _exact_case(bnbF, w, bs, dq, dtype, device, label),
                                       label, 6))
    return rows


def _exact_case(bnbF, w, bs, dq, dtype, device, label) -> list[str]:
    from lora.nf4 import NF4State, dequantize_nf4, quantize_nf4
    ref_p, ref = bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq)
    p, s = quantize_nf4(w, bs, dq, rounding="cuda" if device == "cuda" else "cpu")
    byte_mis = int((p != ref_p).sum())
    abs_mis = int((s.absmax != ref.absmax).sum())
    nested = "-"
    if dq:
        nested = str(int((s.nested_absmax != ref.state2.absmax).sum())
                     + int(s.offset != ref.offset))
    # dequantize bitsandbytes' own bytes with our code: dequantization exactness on its own
    st = NF4State(absmax=ref.absmax, shape=w.shape, dtype=dtype, blocksize=bs,
                  offset=ref.offset if dq else None,
                  nested_absmax=ref.state2.absmax if dq else None)
    ours = dequantize_nf4(ref_p, st, dtype)
    theirs = bnbF.dequantize_4bit(ref_p, ref, quant_type="nf4").reshape(w.shape)
    dq_diff = float((ours.float() - theirs.float()).abs().max())
    exact = byte_mis == abs_mis == 0 and nested in ("-", "0") and dq_diff == 0
    return [label, str(byte_mis), str(abs_mis), nested, f"{dq_diff:.3g}",
            "exact" if exact else "DIFF"]


def throughput(device: str) -> list[list[str]]:
    from lora.nf4 import dequantize_nf4, quantize_nf4
    from lora.nf4_linear import NF4Linear
    bnbF = _bnb()
    rows = []
    w = torch.randn(SIZE, SIZE, device=device) * 0.02

    def add(case, fns):
        def run():
            t = time_alternating(fns, warmup=3, repeats=REPEATS, device=device)
            o = median_ms(t["ours"])
            r = median_ms(t["bnb"]) if "bnb" in t else float("nan")
            return [case, f"{o:.3f}", f"{r:.3f}", ratio(o, r) if r == r else "n/a"]
        rows.append(_guard(run, case, 4))
        print(rows[-1], flush=True)

    for dq in (False, True):
        p, s = quantize_nf4(w, 64, dq)
        fns = {"ours": lambda: dequantize_nf4(p, s, torch.bfloat16)}
        if bnbF is not None:
            rp, rs = bnbF.quantize_4bit(w.bfloat16(), blocksize=64, quant_type="nf4",
                                        compress_statistics=dq)
            fns["bnb"] = lambda: bnbF.dequantize_4bit(rp, rs, quant_type="nf4")
        add(f"dequantize {SIZE}x{SIZE} -> bf16{' (DQ)' if dq else ''}", fns)
    fns = {"ours": lambda: quantize_nf4(w, 64, True)}
    if bnbF is not None:
        fns["bnb"] = lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                compress_statistics=True)
    add(f"quantize {SIZE}x{SIZE} NF4+DQ", fns)
    lin = torch.nn.Linear(SIZE, SIZE, bias=False, device=device)
    ours = NF4Linear.from_linear(lin, 64, True, compute_dtype=torch.bfloat16)
    x = torch.randn(*TOKENS, SIZE, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def fwd_bwd(layer):
        x.grad = None
        layer(x).backward(g)

    fns = {"ours": lambda: fwd_bwd(ours)}
    if bnbF is not None:
        import bitsandbytes as bnb
        ref = bnb.nn.Linear4bit(SIZE, SIZE, bias=False, compute_dtype=torch.bfloat16,
                                quant_type="nf4", compress_statistics=True)
        ref.weight = bnb.nn.Params4bit(lin.weight.detach().cpu(), requires_grad=False,
                                       quant_type="nf4", compress_statistics=True,
                                       blocksize=64).to(device)
        fns["bnb"] = lambda: fwd_bwd(ref)
    add(f"NF4 linear fwd+bwd {TOKENS[0]}x{TOKENS[1]} bf16", fns)
    return rows


def training(device: str) -> list[list[str]]:
    import transformers
    import lora
    config = transformers.LlamaConfig(**MODEL)
    ids = torch.randint(3, MODEL["vocab_size"], STEP_SHAPE, device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def build(kind):
        torch.manual_seed(0)
        # every setup starts from the same bf16 model; the 4-bit ones quantize its linears
        model = transformers.AutoModelForCausalLM.from_config(config).to(device, torch.bfloat16)
        if kind == "ours QLoRA (NF4+DQ, bf16 compute)":
            lora.quantize_model(model, compute_dtype=torch.bfloat16)
        elif kind != "ours LoRA (bf16 base)":  # peft + bitsandbytes QLoRA
            import bitsandbytes as bnb
            import peft
            for name, mod in list(model.named_modules()):
                if type(mod) is torch.nn.Linear and not name.endswith("lm_head"):
                    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4",
                                          compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(mod.weight.detach().cpu(), requires_grad=False,
                                                 quant_type="nf4", compress_statistics=True,
                                                 blocksize=64).to(device)
                    parent, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(parent), attr, q)
            model.is_loaded_in_4bit = True
            for p in model.parameters():
                p.requires_grad_(False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return peft.get_peft_model(model, peft.LoraConfig(
                    r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
        return lora.add_lora(model, lora.LoRAConfig(r=16, alpha=32, target_modules=targets))

    def measure(kind: str) -> list[str]:
        base = torch.cuda.memory_allocated()
        model = build(kind)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        weights = torch.cuda.memory_allocated() - base

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time_alternating({"x": step}, warmup=0, repeats=REPEATS, device=device)["x"]
        peak = torch.cuda.max_memory_allocated() - base
        return [kind, f"{median_ms(t):.1f}", f"{weights / 2**20:.0f}", f"{peak / 2**20:.0f}"]

    kinds = ["ours QLoRA (NF4+DQ, bf16 compute)", "ours LoRA (bf16 base)"]
    if _bnb() is not None:
        kinds.append("peft+bnb QLoRA (bf16 compute)")
    rows = []
    for kind in kinds:
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(_guard(lambda: measure(kind), kind, 4))
        print(rows[-1], flush=True)
    return rows


def _guard(fn, label: str, width: int):
    """Run one measurement; a failure becomes a table row instead of ending the script."""
    try:
        return fn()
    except Exception as exc:  # e.g. a bitsandbytes build without kernels for this GPU
        return [label, f"ERROR {type(exc).__name__}: {str(exc)[:120]}"] + ["-"] * (width - 2)


def cpu_smoke() -> str:
    """Without CUDA: a quick CPU check that the script's pieces run and match bitsandbytes-CPU."""
    from lora.nf4 import quantize_nf4
    bnbF = _bnb()
    w = torch.randn(256, 512)
    p, s = quantize_nf4(w, 64, True)
    if bnbF is None:
        return "CPU smoke: bitsandbytes not installed; quantization ran."
    rp, rs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    same = torch.equal(p, rp) and torch.equal(s.absmax, rs.absmax)
    return f"CPU smoke: bit-exact with bitsandbytes-CPU: {same}."


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "benchmarks_gpu_nf4.md"
    t0 = time.time()
    parts = ["# NF4 on GPU: ours vs bitsandbytes CUDA\n"]
    if not torch.cuda.is_available():
        msg = cpu_smoke()
        print(f"CUDA not available: GPU checks skipped. {msg}")
        parts += [header(torch.get_num_threads()), "", f"CUDA not available: skipped. {msg}"]
    else:
        parts += [header(0, "cuda"), ""]
        ex = _guard(lambda: exactness("cuda"), "exactness", 6)
        ex = ex if isinstance(ex[0], list) else [ex]
        parts += ["## Bit-exactness (rounding='cuda')", "",
                  markdown_table(["case", "byte mismatches", "absmax mismatches",
                                  "nested mismatches", "dequant max|diff|", "verdict"], ex), ""]
        n_exact = sum(r[-1] == "exact" for r in ex)
        print(f"exactness: {n_exact}/{len(ex)} cases exact", flush=True)
        parts += [f"{n_exact}/{len(ex)} cases exact.", ""]
        tp = _guard(lambda: throughput("cuda"), "throughput", 4)
        tp = tp if isinstance(tp[0], list) else [tp]
        parts += ["## Throughput", "", markdown_table(["case", "ours ms", "bnb ms", "ours/bnb"],
                                                      tp), ""]
        tr = training("cuda")
        parts += [f"## Training step, llama-shaped {MODEL['hidden_size']}x"
                  f"{MODEL['num_hidden_layers']} layers, batch {STEP_SHAPE}, LoRA r16 all linear",
                  "", markdown_table(["setup", "ms/step", "weights MiB", "peak MiB"], tr), ""]
    parts.append(f"_total runtime {time.time() - t0:.0f} s_")
    text = "\n".join(parts) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)


if __name__ == "__main__":
    main()
