#!/usr/bin/env python3
"""Writes the torchao reference vectors of burn-8bit's 4-bit states.

Every file is one case, run on the CPU by the real torchao (see README.md beside this script for
what each file holds): its 4-bit maps, its 4-bit block-wise quantizer (the one its
`OptimState4bit` stores states with) and trajectories of its `Adam4bit` / `AdamW4bit` next to
their 32-bit twins. Three modes:

    python generate.py --out DIR                  # new inputs from --seed (default 0)
    python generate.py --out DIR --inputs-from .  # the committed inputs, outputs made anew
    python generate.py --check .                  # remake every output from the committed
                                                  # inputs and compare with the committed files

Inputs are the quantize cases' `input`, the optimizer cases' `param0` and `grad.t`, and their
hyper-parameters; everything else is torchao's output.
"""

import json
import math
import pathlib
import random
import sys

import torch
import torchao
from torchao.optim import Adam4bit, AdamW4bit
from torchao.optim.quant_utils import dequant_with_qmap, quantize_4bit_with_qmap, scale_tensor
from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import vectors  # noqa: E402  (the shared part, one folder up)

SOURCE = f"torchao {torchao.__version__} (CPU), torch {torch.__version__.split('+')[0]}"
BLOCKSIZE = 128
MIN_QUANTIZED_SIZE = 4096
STEPS = 12
# The metadata entries that are inputs (hyper-parameters), not outputs.
HYPER_KEYS = ("lr", "weight_decay", "betas", "eps")

# (data kind, elements, block size): torchao cuts a tensor into rows of one block, so every
# length is a multiple of its block size. Second moments use the unsigned map, the rest the
# signed one.
QUANTIZE_CASES = [
    ("heavy", 20480, 128),
    ("huge", 4096, 128),
    ("mixed_scale", 51200, 128),
    ("normal", 10240, 128),
    ("normal", 8192, 64),
    ("normal", 8192, 256),
    ("normal", 8192, 1024),
    ("second_moment", 10240, 128),
    ("second_moment", 10240, 2048),
    ("sparse", 7680, 128),
    ("tiny", 4096, 128),
]

# (optimizer, elements): 8448 = 66 blocks of 128, quantized; 1000 is below torchao's 4096 and
# keeps f32 states.
OPTIMIZER_CASES = [
    ("adam", 8448),
    ("adamw", 1000),
    ("adamw", 8448),
]

AO_CLASS = {"adam": Adam4bit, "adamw": AdamW4bit}
TORCH_CLASS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def hyper_parameters(name, rng):
    """Hyper-parameters of an optimizer case, as metadata strings (JSON-encoded numbers)."""
    lr = 1e-3 * math.exp(rng.uniform(-1, 1))
    meta = {"lr": json.dumps(lr), "betas": json.dumps([0.9, 0.999]), "eps": json.dumps(1e-8)}
    meta["weight_decay"] = json.dumps(10 ** rng.uniform(-3, -2) if name == "adamw" else 0.0)
    return meta


def qmap(map_name):
    values = get_qmap_signed() if map_name == "dynamic_signed_4" else get_qmap_unsigned()
    return torch.tensor(values, dtype=torch.float32)


def maps_case():
    tensors = {name: qmap(name) for name in ("dynamic_signed_4", "linear_unsigned_4")}
    return tensors, {"kind": "maps", "source": SOURCE}


def quantize_case(x, blocksize, map_name):
    """torchao's 4-bit quantizer as `OptimState4bit` stores a state: scale, codes (one byte each
    here; torchao packs two per byte), and the dequantized values."""
    code = qmap(map_name)
    scaled, scale = scale_tensor(x, blocksize)
    codes = quantize_4bit_with_qmap(scaled, code)
    assert (x.view(-1, blocksize).abs().amax(-1) > 0).all(), "an all-zero block would record absmax 1e-12"
    tensors = {
        "input": x,
        "code": code,
        "codes": codes,
        "absmax": scale,
        "dequantized": dequant_with_qmap(codes, code, scale),
    }
    meta = {"kind": "quantize", "source": SOURCE, "map": map_name, "blocksize": str(blocksize), "n": str(len(x))}
    return tensors, meta


def run_optimizer(cls, hyper, param0, grads, **extra):
    """`cls` on one parameter; the parameter after every step."""
    kwargs = {key: json.loads(hyper[key]) for key in ("lr", "eps", "weight_decay")}
    kwargs["betas"] = tuple(json.loads(hyper["betas"]))
    param = torch.nn.Parameter(param0.clone())
    optimizer = cls([param], **kwargs, **extra)
    trajectory = []
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        trajectory.append(param.detach().clone())
    return trajectory


def optimizer_case(name, hyper, param0, grads):
    """torchao's 4-bit run and, from the same start and gradients, PyTorch's own 32-bit optimizer
    (`torch.optim.Adam` / `AdamW`, one tensor at a time)."""
    n = len(param0)
    run4 = run_optimizer(AO_CLASS[name], hyper, param0, grads, block_size=BLOCKSIZE)
    run32 = run_optimizer(TORCH_CLASS[name], hyper, param0, grads, foreach=False)
    tensors = {"param0": param0}
    for step, (grad, param, param32) in enumerate(zip(grads, run4, run32), start=1):
        tensors[f"grad.{step}"] = grad
        tensors[f"param.{step}"] = param
        tensors[f"param32.{step}"] = param32
    quantized = n >= MIN_QUANTIZED_SIZE and n % BLOCKSIZE == 0
    meta = {
        "kind": "optimizer",
        "source": SOURCE,
        "optimizer": name,
        "reference_class": AO_CLASS[name].__name__,
        "n": str(n),
        "steps": str(len(grads)),
        "blocksize": str(BLOCKSIZE),
        "min_8bit_size": str(MIN_QUANTIZED_SIZE),
        "state_bits": "4" if quantized else "32",
        **hyper,
    }
    return tensors, meta


def cases(seed, inputs_from):
    """Every case as (file name, tensors, metadata); inputs from `inputs_from` when given."""
    yield "maps4.safetensors", *maps_case()
    for index, (kind, n, blocksize) in enumerate(QUANTIZE_CASES):
        stem = f"quant4_{kind}_n{n}_bs{blocksize}.safetensors"
        x = vectors.quantize_input(stem, kind, n, seed, index, inputs_from)
        map_name = "linear_unsigned_4" if kind == "second_moment" else "dynamic_signed_4"
        yield stem, *quantize_case(x, blocksize, map_name)
    for index, (name, n) in enumerate(OPTIMIZER_CASES):
        stem = f"optim4_{name}_n{n}.safetensors"
        param0, grads, hyper = vectors.optimizer_inputs(
            stem, n, STEPS, seed, index, inputs_from, HYPER_KEYS,
            lambda: hyper_parameters(name, random.Random(f"{seed}/{name}/{n}")),
        )
        yield stem, *optimizer_case(name, hyper, param0, grads)


if __name__ == "__main__":
    sys.exit(vectors.main(__doc__, cases, len(QUANTIZE_CASES) + len(OPTIMIZER_CASES) + 1))
