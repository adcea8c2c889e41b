"""What the reference-vector generators beside this file share: the quantize inputs' recipe,
reading a case back, comparing a remade case with the committed one, and the command line.

Each generator (`bitsandbytes-0.50.2/generate.py`, `torchao-0.18.0/generate.py`) imports this
module from the folder above its own and supplies its cases.
"""

import argparse
import pathlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Parameter trajectories may differ from the committed ones by this much, relative to the largest
# |p|, on another CPU: PyTorch's vectorised kernels (AVX2 vs AVX-512), and torch.compile's
# generated code, round a few elements differently. Everything else must be equal.
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


def read(path):
    """Tensors and metadata of a safetensors file."""
    with safe_open(path, "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


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


def quantize_input(stem, kind, n, seed, index, inputs_from):
    """A quantize case's input: the committed one from `inputs_from`, else drawn from `seed`."""
    if inputs_from:
        return read(inputs_from / stem)[0]["input"]
    return data(kind, n, torch.Generator().manual_seed(seed * 1000 + index))


def optimizer_inputs(stem, n, steps, seed, index, inputs_from, hyper_keys, new_hyper):
    """`param0`, the gradients and the hyper-parameters of an optimizer case: the committed ones
    from `inputs_from` (the metadata entries named in `hyper_keys`), else drawn from `seed`, with
    `new_hyper()` for the hyper-parameters."""
    if inputs_from:
        tensors, meta = read(inputs_from / stem)
        grads = [tensors[f"grad.{t}"] for t in range(1, int(meta["steps"]) + 1)]
        return tensors["param0"], grads, {k: v for k, v in meta.items() if k in hyper_keys}
    gen = torch.Generator().manual_seed(seed * 1000 + 500 + index)
    param0 = 0.1 * torch.randn(n, generator=gen)
    grads = [0.01 * (1 + 0.2 * (t - 1)) * torch.randn(n, generator=gen) for t in range(1, steps + 1)]
    return param0, grads, new_hyper()


def main(doc, cases, total):
    """The command line of a generator whose module docstring is `doc`: `cases(seed, inputs_from)`
    yields every case as (file name, tensors, metadata), `total` of them."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        print(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0
