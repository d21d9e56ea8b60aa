"""Memory of loading a backbone and training LoRA / QLoRA on it: ours vs peft + bitsandbytes.

Every case runs in a fresh subprocess, which reports three numbers from the kernel's RSS
counters (VmRSS / VmHWM; the peak mark is reset with /proc/self/clear_refs before each phase):
RSS right after the load, the peak during the load, and the peak over the training steps.

Backbones: SmolLM2-135M-Instruct (bundled; fp32 single file) and a random-init Llama-shaped
~1B model (hidden 2048, 16 layers, MLP 5632, vocab 32k: 0.95B parameters) that this script saves once, sharded, in bf16
under the purepeft cache (``$PUREPEFT_CACHE/bench``), never in the repository.

    python benchmarks/bench_load.py            # smollm2 and llama-1b (writes docs/benchmarks.md)
    python benchmarks/bench_load.py --quick    # a small Llama-shaped model, 3 steps
    python benchmarks/bench_load.py --models smollm2 --steps 5
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import bench_args, emit, markdown_table, ratio, set_threads, should_write
from train.memory import RELEASE_MODES

# ---------------------------------------------------------------------------------- knobs
STEPS = 10
RANK = 8
TARGETS = ["q_proj", "v_proj"]
# name -> (batch, seq) of the training steps
SHAPES = {"smollm2": (2, 64), "llama-1b": (1, 32), "llama-small": (2, 32)}
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_SMALL = dict(LLAMA_1B, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=8, vocab_size=8000)
# case -> (stack, method, base dtype); QLoRA computes in its base dtype
CASES = {
    "ours QLoRA": ("ours", "qlora", "fp32"),
    "peft+bnb QLoRA": ("peft", "qlora", "fp32"),
    "ours LoRA fp32": ("ours", "lora", "fp32"),
    "ours LoRA bf16": ("ours", "lora", "bf16"),
    "ours QLoRA (bf16 base)": ("ours", "qlora", "bf16"),
    "peft+bnb QLoRA (bf16 base)": ("peft", "qlora", "bf16"),
}
DEFAULT_CASES = tuple(CASES)
REFERENCE = {"ours QLoRA": "peft+bnb QLoRA", "ours QLoRA (bf16 base)": "peft+bnb QLoRA (bf16 base)"}
SECTION = "load"

CHILD = r"""
import gc, json, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
import transformers
transformers.logging.set_verbosity_error()
stack, method, dtype_name, folder, _threads, steps, batch, seq, release = sys.argv[1:10]
steps, batch, seq = int(steps), int(batch), int(seq)
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
TARGETS = json.loads(sys.argv[10])
import lora, peft, bitsandbytes  # every import before the baseline

def rss(field):  # bytes, from the kernel
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def reset_peak():
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

with torch.device("meta"):  # the modelling code is imported before the baseline, for both stacks
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
lora.quantize_nf4(torch.randn(64, 64), 64, True)
reset_peak()
base = rss("VmRSS")
t0 = time.perf_counter()
if stack == "ours":
    from train.adapters import build_adapted, nf4_config
    from train.config import ModelConfig
    from train.models import load_backbone
    quantize = nf4_config(None, "causal_lm", dtype) if method == "qlora" else None
    model = load_backbone(folder, "causal_lm", dtype=dtype, quantize=quantize)
    report = lora.memory_report(model) if method == "qlora" else None
    model = build_adapted(model, ModelConfig(method=method, lora_r=8, lora_alpha=16,
                                             target_modules=tuple(TARGETS)), "causal_lm")
else:
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map="cpu", **({"quantization_config": qcfg} if method == "qlora" else {}))
    report = None
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                        target_modules=TARGETS))
load_s = time.perf_counter() - t0
after_load, load_peak = rss("VmRSS"), rss("VmHWM")
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
gen = torch.Generator().manual_seed(0)
ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=gen)
from train.memory import release_freed_memory, releases_each_step
release_each_step = stack == "ours" and releases_each_step(release, model, torch.device("cpu"))
reset_peak()
losses = []
t0 = time.perf_counter()
for _ in range(steps):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if release_each_step:  # what train.loop does after each CPU step (LoopConfig.release_memory)
        release_freed_memory()
    losses.append(float(loss))
step_s = (time.perf_counter() - t0) / steps
out = dict(base=base, after_load=after_load, load_peak=load_peak, train_peak=rss("VmHWM"),
           load_s=load_s, step_s=step_s, loss0=losses[0], loss_last=losses[-1])
if report is not None:
    out.update(nf4_bytes=report.quantized_bytes, dense_bytes=report.other_bytes)
print("RESULT " + json.dumps(out))
"""


def _cache_root():
    from train.models import cache_dir
    return cache_dir() / "bench"


def llama_folder(name: str, spec: dict) -> str:
    """A random-init Llama of ``spec`` saved sharded in bf16 (once) under the purepeft cache."""
    import torch
    import transformers
    folder = _cache_root() / f"{name}-bf16"
    if (folder / "config.json").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"saving a random-init {name} (bf16, sharded) into {folder} (once)", flush=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**spec),
                                                          dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="400MB")
    del model
    os.replace(tmp, folder)
    return str(folder)


def folder_of(name: str) -> str:
    if name == "smollm2":
        from train.models import resolve_model
        return str(resolve_model("smollm2"))
    return llama_folder(name, LLAMA_1B if name == "llama-1b" else LLAMA_SMALL)


def largest_tensor_bytes(folder: str, dtype_bytes: int) -> int:
    """Elements of the checkpoint's largest tensor times the base dtype's size."""
    from lora import TensorFiles
    from train.models import checkpoint_files
    files = TensorFiles(checkpoint_files(folder))
    import math
    return max(math.prod(files.shape(k)) for k in files.keys()) * dtype_bytes


def run_case(case: str, folder: str, steps: int, threads: int, shape, release: str = "auto") -> dict:
    stack, method, dtype = CASES[case]
    env = dict(os.environ, PYTHONPATH=str(_common.ROOT), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-c", CHILD, stack, method, dtype, folder, str(threads), str(steps),
           str(shape[0]), str(shape[1]), release, json.dumps(TARGETS)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(_common.ROOT))
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail)[:300]}
    return json.loads(line[0][len("RESULT "):])


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=None)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--release-memory", choices=RELEASE_MODES, default="auto",
                   help="ours: LoopConfig.release_memory (auto: after each step for 4-bit models only)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(DEFAULT_CASES))
    args = p.parse_args()
    threads = set_threads(args.threads)
    models = args.models or (["llama-small"] if args.quick else ["smollm2", "llama-1b"])
    steps = 3 if args.quick and args.steps == STEPS else args.steps
    rows, notes = [], []
    for name in models:
        folder = folder_of(name)
        shape = SHAPES[name]
        results = {}
        for case in args.cases:
            t0 = time.time()
            results[case] = r = run_case(case, folder, steps, threads, shape, args.release_memory)
            print(f"{name} | {case} | {r} | {time.time() - t0:.0f} s", flush=True)
        grow = {c: {k: r[k] - r["base"] for k in ("after_load", "load_peak", "train_peak")}
                for c, r in results.items() if "error" not in r}
        lora_peaks = {c: grow[c]["train_peak"] for c in ("ours LoRA fp32", "ours LoRA bf16") if c in grow}
        for case, r in results.items():
            if case not in grow:
                rows.append([name, case, "failed", "", "", "", "", "", r["error"]])
                continue
            g, ref = grow[case], grow.get(REFERENCE.get(case, ""), None)
            vs = " / ".join(ratio(g[k], ref[k]) for k in g) if ref else ""
            vs_lora = " / ".join(ratio(g["train_peak"], lora_peaks[c]) for c in lora_peaks)
            rows.append([name, case, mib(g["after_load"]), mib(g["load_peak"]), mib(g["train_peak"]),
                         f"{r['load_s']:.1f}", f"{r['step_s']:.2f}", vs,
                         vs_lora if "QLoRA" in case else ""])
        for case in ("ours QLoRA", "ours QLoRA (bf16 base)"):
            if case not in grow:
                continue
            r, g = results[case], grow[case]
            width = 4 if CASES[case][2] == "fp32" else 2
            bound = 1.25 * (r["nf4_bytes"] + r["dense_bytes"] + largest_tensor_bytes(folder, width))
            below = lora_peaks and g["train_peak"] < min(lora_peaks.values())
            notes.append(
                f"- {name}, {case}: load peak {mib(g['load_peak'])} MiB vs the bound {mib(bound)} MiB = "
                f"1.25 x (NF4 {mib(r['nf4_bytes'])} + dense {mib(r['dense_bytes'])} + largest tensor "
                f"{mib(largest_tensor_bytes(folder, width))}): {'met' if g['load_peak'] <= bound else 'NOT met'}; "
                f"training peak {mib(g['train_peak'])} MiB vs LoRA fp32 / bf16 "
                f"{' / '.join(mib(x) for x in lora_peaks.values())} MiB: "
                f"{'below both' if below else 'NOT below both'}.")
    table = markdown_table(["model", "case", "RSS after load MiB", "peak during load MiB",
                            f"peak over {steps} steps MiB", "load s", "s / step",
                            "ours / peft+bnb (after load / load peak / train peak)",
                            "train peak / LoRA fp32 / LoRA bf16"], rows)
    text = ("All MiB are growth above the process's RSS after its imports (torch, transformers "
            "and the model's modelling code, peft, bitsandbytes, lora), measured with the kernel's "
            "VmRSS / VmHWM in a fresh process per case; QLoRA computes in its base dtype (fp32 or "
            f"bf16), double quantization on; {steps} AdamW steps of LoRA r={RANK} on {', '.join(TARGETS)}, "
            "batch x seq " + ", ".join(f"{m} {SHAPES[m][0]}x{SHAPES[m][1]}" for m in models) +
            f". Ours trains as `train.loop` does with `release_memory={args.release_memory!r}` ("
            "auto: a 4-bit model's freed heap goes back to the OS after each CPU step, a dense "
            "model's stays with the process, `train/memory.py`); every NF4 matmul dequantizes into one "
            "reused buffer per weight size. Ours loads through `train.models.load_backbone` (streamed; NF4 as it reads), "
            "peft+bnb through `from_pretrained(quantization_config=BitsAndBytesConfig(nf4, "
            "double quant))` + `get_peft_model`. llama-1b is random-init (0.95B parameters), saved "
            "sharded in bf16.\n\n"
            + "\n".join(notes))
    emit(SECTION, "Loading and training memory: ours vs peft + bitsandbytes", threads, table, text,
         write=should_write(args))


if __name__ == "__main__":
    main()
