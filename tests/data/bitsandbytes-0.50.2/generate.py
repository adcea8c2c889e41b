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

import json
import math
import pathlib
import random
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import vectors  # noqa: E402  (the shared part, one folder up)

SOURCE = f"bitsandbytes {bnb.__version__} (CPU), torch {torch.__version__.split('+')[0]}"
BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
STEPS = 12
# The metadata entries that are inputs (hyper-parameters), not outputs.
HYPER_KEYS = ("lr", "weight_decay", "betas", "eps", "momentum", "alpha")

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
        x = vectors.quantize_input(stem, kind, n, seed, index, inputs_from)
        map_name = "dynamic_unsigned" if kind == "second_moment" else "dynamic_signed"
        yield stem, *quantize_case(x, blocksize, map_name)
    for index, (name, n) in enumerate(OPTIMIZER_CASES):
        stem = f"optim_{name}_n{n}.safetensors"
        param0, grads, hyper = vectors.optimizer_inputs(
            stem, n, STEPS, seed, index, inputs_from, HYPER_KEYS,
            lambda: hyper_parameters(name, random.Random(f"{seed}/{name}")),
        )
        yield stem, *optimizer_case(name, hyper, param0, grads)


if __name__ == "__main__":
    sys.exit(vectors.main(__doc__, cases, len(QUANTIZE_CASES) + len(OPTIMIZER_CASES) + 1))
