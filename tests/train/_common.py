"""Shared helpers of the trainer tests: a tiny config and subprocess runs of ``python -m fastclip``."""
import os
import subprocess
import sys

import torch

TINY = ["--model", "tiny-vit", "--threads", "1", "--progress", "lines", "--no-plot",
        "--demo-train-samples", "4096", "--demo-eval-samples", "32"]


def env(**extra):
    """The subprocess environment: this checkout's ``src`` first on the path, one thread."""
    import fastclip
    e = dict(os.environ)
    src = os.path.dirname(os.path.dirname(fastclip.__file__))
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def for_data(tiny, args):
    """``tiny`` without its ``--demo-*`` options (each followed by its value) when ``args`` train
    on real data, and without ``--eval-every`` when they evaluate nothing either: the command
    refuses options the run would not use."""
    if "--train-data" not in args:
        return list(tiny)
    no_eval = "--val-data" not in args and "--zeroshot-data" not in args
    out, it = [], iter(tiny)
    for a in it:
        if a.startswith("--demo-") or (a == "--eval-every" and no_eval):
            next(it)
        else:
            out.append(a)
    return out


def fastclip_cmd(*args):
    return [sys.executable, "-m", "fastclip", "train", *for_data(TINY, args), *args]


def run(args, timeout=240, **extra_env):
    r = subprocess.run(fastclip_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env(**extra_env))
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def weights(run_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, "model.safetensors"))


def assert_same_weights(a, b, exact=True, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k] - b[k]).abs().max().item():.3g}"
        else:
            err = ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item()
            assert err <= rtol, f"{k}: relative difference {err:.3g} > {rtol}"
