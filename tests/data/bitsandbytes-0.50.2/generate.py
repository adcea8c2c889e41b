#!/usr/bin/env python3
"""Writes the bitsandbytes reference vectors that burn-8bit's conformance tests replay.

Every file is one case, run on the CPU by the real bitsandbytes (see README.md beside this script
for what each file holds). Three modes:

    python generate.py --out DIR                  # new inputs from --seed (default 0)
    python generate.py --out DIR --inputs-from .  # the committed inputs, outputs made anew
    python generate.py --check .                  # remake every output from the committed
                                                  # inputs and compare with the committed files

Inputs are the quantize cases' `input`, the optimizer cases' `param0` and `grad.t`, and their
hyper-parameters; everything else is bitsandbytes' output.
"""

import argparse
import json
import math
import pathlib
import random
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors import safe_open
from safetensors.torch import save_file

SOURCE = f"bitsandbytes {bnb.__version__} (CPU), torch {torch.__version__.split('+')[0]}"
BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
STEPS = 12

# (data kind, elements, block size); the map is the signed dynamic one except for second moments.
QUANTIZE_CASES = [
    ("heavy", 20000, 256),
    ("huge", 4096, 256),
    ("mixed_scale", 50000, 256),
    ("normal", 10000, 256),
    ("normal", 12305, 4096),
    ("normal", 5000, 128),
    ("normal", 5000, 64),
    ("normal", 9000, 1024),
    ("normal", 9000, 2048),
    ("normal", 9000, 512),
    ("second_moment", 10000, 2048),
    ("second_moment", 10000, 256),
    ("sparse", 7777, 256),
    ("tiny", 4096, 256),
]

# (optimizer, elements): n = 1000 is below min_8bit_size, so bitsandbytes keeps f32 state.
OPTIMIZER_CASES = [
    ("adagrad", 8513),
    ("adam", 1000),
    ("adam", 8513),
    ("adamw", 8513),
    ("ademamix", 8513),
    ("lion", 8513),
    ("momentum", 8513),
    ("rmsprop", 8513),
]

BNB_CLASS = {
    "adagrad": "Adagrad8bit",
    "adam": "Adam8bit",
    "adamw": "AdamW8bit",
    "ademamix": "AdEMAMix8bit",
    "lion": "Lion8bit",
    "momentum": "SGD8bit",
    "rmsprop": "RMSprop8bit",
}

# Parameter trajectories are allowed to differ from the committed ones by this much, relative to
# the largest |p|: PyTorch's vectorised CPU kernels (AVX2 vs AVX-512) round a few elements of
# `p.add_(update, alpha=…)` differently. Codes, absmax, states and quantize outputs must be equal.
PARAM_TOLERANCE = 1e-6


def data(kind, n, gen):
    """One quantize input of `kind`: f32[n]."""
    normal = torch.randn(n, generator=gen)
    if kind == "normal":
        return normal
    if kind == "heavy":  # rare huge outliers on a unit normal
        outliers = torch.rand(n, generator=gen) < 0.002
        scale = 20 + 80 * torch.rand(n, generator=gen)
        return torch.where(outliers, normal.sign() * scale, normal)
    if kind == "tiny":
        return normal * 1e-7
    if kind == "huge":
        return normal * 3e4
    if kind == "mixed_scale":  # each run of 64 elements at its own scale, 1e-8 .. 1e2
        runs = -(-n // 64)
        scales = 10 ** (-8 + 10 * torch.rand(runs, generator=gen))
        return normal * scales.repeat_interleave(64)[:n]
    if kind == "sparse":  # 90 % exact zeros
        keep = torch.rand(n, generator=gen) >= 0.9
        return torch.where(keep, normal, torch.zeros(n))
    if kind == "second_moment":  # non-negative, like Adam's v
        return (0.01 * normal) ** 2 * torch.exp(torch.randn(n, generator=gen))
    raise ValueError(kind)


def hyper_parameters(name, rng):
    """Hyper-parameters of an optimizer case, as metadata strings (JSON-encoded numbers)."""
    lr = {"adam": 1e-4, "adamw": 1e-3, "ademamix": 2e-4, "lion": 3e-5}.get(name, 3e-3)
    meta = {"lr": json.dumps(lr * math.exp(rng.uniform(-1, 1))), "weight_decay": json.dumps(0.0)}
    if name in ("adam", "adamw"):
        meta["betas"] = json.dumps([0.9, 0.999 if name == "adam" else 0.995])
        meta["eps"] = json.dumps(1e-8)
    if name in ("adamw", "lion"):
        meta["weight_decay"] = json.dumps(10 ** rng.uniform(-3, -2))
    if name == "lion":
        meta["betas"] = json.dumps([0.9, 0.99])
    if name == "ademamix":
        meta.update(betas=json.dumps([0.9, 0.999, 0.9999]), alpha=json.dumps(5.0), eps=json.dumps(1e-8))
    if name == "momentum":
        meta["momentum"] = json.dumps(0.9)
    if name == "rmsprop":
        meta.update(alpha=json.dumps(0.99), eps=json.dumps(1e-8))
    if name == "adagrad":
        meta["eps"] = json.dumps(1e-10)
    return meta


def read(path):
    """Tensors and metadata of a safetensors file."""
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def maps_case():
    tensors = {
        f"{kind}_{sign}": maker(signed=sign == "signed")
        for kind, maker in (("dynamic", F.create_dynamic_map), ("linear", F.create_linear_map))
        for sign in ("signed", "unsigned")
    }
    return tensors, {"kind": "maps", "source": SOURCE}


def quantize_case(x, blocksize, map_name):
    code = F.create_dynamic_map(signed=map_name == "dynamic_signed")
    codes, state = F.quantize_blockwise(x, code=code, blocksize=blocksize)
    tensors = {
        "input": x,
        "code": code,
        "codes": codes,
        "absmax": state.absmax,
        "dequantized": F.dequantize_blockwise(codes, state),
    }
    meta = {"kind": "quantize", "source": SOURCE, "map": map_name, "blocksize": str(blocksize), "n": str(len(x))}
    return tensors, meta


def run_optimizer(name, hyper, param0, grads, min_8bit_size):
    """bitsandbytes' 8-bit optimizer class on one parameter; its per-step parameter and state."""
    kwargs = {"lr": float(hyper["lr"]), "min_8bit_size": min_8bit_size}
    for key in ("betas", "eps", "weight_decay", "momentum", "alpha"):
        if key in hyper:
            value = json.loads(hyper[key])
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    param = torch.nn.Parameter(param0.clone())
    optimizer = getattr(bnb.optim, BNB_CLASS[name])([param], **kwargs)
    trajectory = []
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        state = optimizer.state[param]
        trajectory.append((param.detach().clone(), {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}))
    return trajectory


def optimizer_case(name, hyper, param0, grads):
    """The 8-bit run and, from the same start and gradients, its 32-bit twin: the same class
    with `min_8bit_size` above the tensor's size (bitsandbytes 0.50.2's `AdEMAMix32bit` fails on
    the CPU: it allocates one EMA buffer where the update needs two)."""
    n = len(param0)
    run8 = run_optimizer(name, hyper, param0, grads, MIN_8BIT_SIZE)
    run32 = run_optimizer(name, hyper, param0, grads, n + 1)
    tensors = {"param0": param0}
    for step, (grad, (param, state), (param32, _)) in enumerate(zip(grads, run8, run32), start=1):
        tensors[f"grad.{step}"] = grad
        tensors[f"param.{step}"] = param
        tensors[f"param32.{step}"] = param32
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in state:
                tensors[f"{key}.{step}"] = state[key]
    meta = {
        "kind": "optimizer",
        "source": SOURCE,
        "optimizer": name,
        "bnb_class": BNB_CLASS[name],
        "n": str(n),
        "steps": str(len(grads)),
        "blocksize": str(BLOCKSIZE),
        "min_8bit_size": str(MIN_8BIT_SIZE),
        "state_bits": "8" if n >= MIN_8BIT_SIZE else "32",
        **hyper,
    }
    return tensors, meta


def cases(seed, inputs_from):
    """Every case as (file name, tensors, metadata); inputs from `inputs_from` when given."""
    yield "maps.safetensors", *maps_case()
    for index, (kind, n, blocksize) in enumerate(QUANTIZE_CASES):
        stem = f"quant_{kind}_n{n}_bs{blocksize}.safetensors"
        if inputs_from:
            x = read(inputs_from / stem)[0]["input"]
        else:
            x = data(kind, n, torch.Generator().manual_seed(seed * 1000 + index))
        map_name = "dynamic_unsigned" if kind == "second_moment" else "dynamic_signed"
        yield stem, *quantize_case(x, blocksize, map_name)
    for index, (name, n) in enumerate(OPTIMIZER_CASES):
        stem = f"optim_{name}_n{n}.safetensors"
        if inputs_from:
            tensors, meta = read(inputs_from / stem)
            steps = int(meta["steps"])
            param0, grads = tensors["param0"], [tensors[f"grad.{t}"] for t in range(1, steps + 1)]
            hyper = {k: v for k, v in meta.items() if k in ("lr", "weight_decay", "betas", "eps", "momentum", "alpha")}
        else:
            gen = torch.Generator().manual_seed(seed * 1000 + 500 + index)
            param0 = 0.1 * torch.randn(n, generator=gen)
            grads = [0.01 * (1 + 0.2 * (t - 1)) * torch.randn(n, generator=gen) for t in range(1, STEPS + 1)]
            hyper = hyper_parameters(name, random.Random(f"{seed}/{name}"))
        yield stem, *optimizer_case(name, hyper, param0, grads)


def compare(stem, tensors, meta, committed_dir):
    """Differences between a remade case and the committed file, as lines, and a note on the
    parameter tensors that agree only within the tolerance."""
    committed, committed_meta = read(committed_dir / stem)
    problems, close, worst_close = [], 0, 0.0
    if meta != committed_meta:
        problems.append(f"metadata differs: {meta} vs {committed_meta}")
    if tensors.keys() != committed.keys():
        problems.append(f"tensor names differ: {sorted(tensors.keys() ^ committed.keys())}")
    for key in sorted(tensors.keys() & committed.keys()):
        ours, theirs = tensors[key], committed[key]
        if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
            problems.append(f"{key}: {ours.dtype}{list(ours.shape)} vs {theirs.dtype}{list(theirs.shape)}")
        elif torch.equal(ours, theirs):
            continue
        elif key.startswith("param"):
            worst = (ours - theirs).abs().max().item() / theirs.abs().max().item()
            if worst > PARAM_TOLERANCE:
                problems.append(f"{key}: differs by {worst:.3g} of max |p| (tolerance {PARAM_TOLERANCE})")
            close, worst_close = close + 1, max(worst_close, worst)
        else:
            problems.append(f"{key}: {int((ours != theirs).sum())} elements differ")
    note = f" ({close} parameter tensors within {worst_close:.2g} of max |p|, the rest bit for bit)" if close else ""
    return problems, note


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=pathlib.Path, help="write every case into this directory")
    mode.add_argument("--check", type=pathlib.Path, help="remake the cases of this directory and compare")
    parser.add_argument("--inputs-from", type=pathlib.Path, help="take inputs from this directory's files")
    parser.add_argument("--seed", type=int, default=0, help="seed of new inputs (default 0)")
    args = parser.parse_args()
    failed = 0
    inputs_from = args.check or args.inputs_from
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for stem, tensors, meta in cases(args.seed, inputs_from):
        if args.out:
            save_file({k: v.contiguous() for k, v in tensors.items()}, args.out / stem, metadata=meta)
            print(f"wrote {args.out / stem}")
            continue
        problems, note = compare(stem, tensors, meta, args.check)
        failed += bool(problems)
        print(f"{stem}: {'same' if not problems else 'DIFFERS'}{note}")
        for problem in problems:
            print(f"    {problem}")
    if args.check:
        total = len(QUANTIZE_CASES) + len(OPTIMIZER_CASES) + 1
        print(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
