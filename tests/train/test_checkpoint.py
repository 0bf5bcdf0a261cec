"""Training checkpoints: an exact round trip of every state, written with the umask, and loading
never runs code from the file (a planted pickle is refused, not executed)."""
import json
import os
import random
import re

import numpy as np
import pytest
import torch

from fastclip.models import create_model
from fastclip.train import checkpoint as ckpt
from fastclip.train.optim import create_optimizer, create_scheduler

from ._common import TINY


def _setup(seed, model="tiny-rn"):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    m = create_model(model, context_length=8, image_size=32)
    if m.config.is_resnet:
        m = m.to(memory_format=torch.channels_last)  # as the trainer runs ResNet towers
    opt = create_optimizer(m, 1e-3, 0.1, (0.9, 0.98), 1e-6)
    sched = create_scheduler(opt, 3, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return m, opt, sched, scaler


def _step(m, opt, sched):
    img = torch.randn(2, 3, m.image_size, m.image_size).to(memory_format=torch.channels_last)
    i, t, s = m(img, torch.randint(1, 100, (2, 8)))
    (i.sum() + t.sum() * s).backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def test_round_trip_restores_every_state_exactly(tmp_path):
    m, opt, sched, scaler = _setup(0)
    for _ in range(2):
        _step(m, opt, sched)
    random.seed(7)
    np.random.seed(8)
    torch.manual_seed(9)
    rng = ckpt.rng_state()
    extra = {"skipped": 3, "wall_time_s": 12.5, "config": {"lr": 1e-3, "model_overrides": {}, "steps": None}}
    path = ckpt.save_training_state(str(tmp_path), 2, m, opt, sched, scaler, extra=extra)
    assert path.endswith("step_00000002.safetensors")
    expected = {"model": m.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}

    m2, opt2, sched2, scaler2 = _setup(1)
    _step(m2, opt2, sched2)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    state = ckpt.load_training_state(path, m2, opt2, sched2, scaler2)
    assert state["step"] == 2 and state["extra"] == extra
    assert _same(expected["model"], m2.state_dict())
    assert _same(expected["opt"], opt2.state_dict())
    assert _same(expected["sched"], sched2.state_dict())
    assert _same(rng, ckpt.rng_state())
    for p in m2.parameters():  # the moments keep their parameter's layout (channels_last convolutions)
        for v in opt2.state[p].values():
            if v.shape == p.shape:
                assert v.stride() == p.stride()
    # both continue identically
    torch.manual_seed(5)
    _step(m, opt, sched)
    torch.manual_seed(5)
    _step(m2, opt2, sched2)
    assert _same(m.state_dict(), m2.state_dict())


def test_checkpoints_are_written_with_the_umask(tmp_path):
    m, opt, sched, scaler = _setup(0, "tiny-vit")
    old = os.umask(0o022)
    try:
        path = ckpt.save_training_state(str(tmp_path), 1, m, opt, sched, scaler)
    finally:
        os.umask(old)
    assert (os.stat(path).st_mode & 0o777) == 0o644
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]


def test_a_planted_pickle_is_never_unpickled(tmp_path):
    """A .pt file in the run folder, or passed to --resume, is refused with a message naming it,
    and the code inside it never runs."""
    from tests._hostile import write_malicious_pickle
    marker = tmp_path / "written-by-the-pickle"
    planted = tmp_path / "run" / "checkpoints" / "step_00000005.pt"
    planted.parent.mkdir(parents=True)
    write_malicious_pickle(planted, marker)
    m, opt, sched, scaler = _setup(0, "tiny-vit")
    with pytest.raises(ValueError, match=r"step_00000005\.pt.*pickle.*convert"):
        path = ckpt.resolve_resume("latest", str(tmp_path / "run"))
        ckpt.load_training_state(path, m, opt, sched, scaler)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"step_00000005\.pt.*pickle"):
        ckpt.load_training_state(str(planted), m, opt, sched, scaler)
    assert not marker.exists()
    elsewhere = tmp_path / "innocent-name.safetensors"  # the content decides, not the name
    elsewhere.write_bytes(planted.read_bytes())
    with pytest.raises(ValueError, match=r"innocent-name\.safetensors.*pickle"):
        ckpt.load_training_state(str(elsewhere), m, opt, sched, scaler)
    assert not marker.exists()
    # the converter for old checkpoints reads with weights_only=True: refused as well
    with pytest.raises(ValueError, match=r"step_00000005\.pt"):
        ckpt.convert_legacy_checkpoint(str(planted))
    assert not marker.exists()


@pytest.mark.parametrize("how", ["latest", "path"])
def test_cli_resume_refuses_a_planted_pickle(tmp_path, how, capsys):
    """fastclip train --resume latest (the pickle planted as the newest checkpoint of --output) or
    --resume path.pt: a one-line error naming the file, exit status 2, the pickle never runs."""
    from fastclip import cli
    from tests._hostile import write_malicious_pickle
    marker = tmp_path / "written-by-the-pickle"
    out = tmp_path / "run"
    planted = out / "checkpoints" / "step_00000005.pt"
    planted.parent.mkdir(parents=True)
    write_malicious_pickle(planted, marker)
    resume = "latest" if how == "latest" else str(planted)
    code = cli.main(["train", *TINY, "--steps", "8", "--batch-size", "8", "--progress", "none",
                     "--output", str(out), "--resume", resume])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "step_00000005.pt" in lines[0] and "Traceback" not in err, err


def test_unusable_files_raise_a_clear_error_naming_them(tmp_path):
    from safetensors.torch import save_file

    from fastclip.models import save_checkpoint
    m, opt, sched, scaler = _setup(0, "tiny-vit")
    good = ckpt.save_training_state(str(tmp_path / "a"), 3, m, opt, sched, scaler)
    data = open(good, "rb").read()
    cases = {}
    cases["truncated.safetensors"] = data[: len(data) // 2]
    cases["junk.safetensors"] = b"not a checkpoint at all"
    cases["empty.safetensors"] = b""
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    save_checkpoint(m, str(tmp_path / "model.safetensors"))  # a model file, not a training state
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    meta = {"format": ckpt.FORMAT, "format_version": "1"}
    for name, state in (("badjson", "{oops"), ("notdict", "[1, 2]"), ("nostep", '{"dict": []}'),
                        ("badtensor", '{"dict": [["step", 1], ["model", {"tensor": "nope"}]]}')):
        save_file({"x": torch.zeros(1)}, str(tmp_path / f"{name}.safetensors"), metadata={**meta, "state": state})
    names = ["truncated", "junk", "empty", "model", "other", "badjson", "notdict", "nostep", "badtensor"]
    for name in names:
        with pytest.raises(ckpt.CheckpointError, match=rf"{name}\.safetensors"):
            ckpt.load_training_state(str(tmp_path / f"{name}.safetensors"), m, opt, sched, scaler)
    other_model = create_model("tiny-rn", context_length=8)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000003\.safetensors.*does not match"):
        ckpt.load_training_state(good, other_model, create_optimizer(other_model, 1e-3), sched, scaler)
    # A trainer's checkpoint carries its configuration: the error names the model it holds.
    named = ckpt.save_training_state(str(tmp_path / "b"), 3, m, opt, sched, scaler,
                                     extra={"config": {"model": "tiny-vit", "loss": "clip"}})
    with pytest.raises(ckpt.CheckpointError, match=r"holds model 'tiny-vit', loss 'clip'"):
        ckpt.load_training_state(named, other_model, create_optimizer(other_model, 1e-3), sched, scaler)


def test_convert_legacy_checkpoint(tmp_path):
    """A checkpoint in the earlier pickle format (torch.save of a dict with numpy RNG state) converts to the
    current format without unpickling anything but tensors and plain values."""
    m, opt, sched, scaler = _setup(0, "tiny-vit")
    _step(m, opt, sched)
    old = {"step": 4, "model": m.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
           "scaler": scaler.state_dict(), "rng": ckpt.rng_state(), "extra": {"skipped": 2}}
    legacy = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    legacy.parent.mkdir(parents=True)
    torch.save(old, str(legacy))
    with pytest.raises(ckpt.CheckpointError, match="convert_legacy_checkpoint"):
        ckpt.resolve_resume("latest", str(tmp_path / "run"))
    new = ckpt.convert_legacy_checkpoint(str(legacy))
    assert new.endswith("step_00000004.safetensors")
    assert ckpt.resolve_resume("latest", str(tmp_path / "run")) == new
    m2, opt2, sched2, scaler2 = _setup(1, "tiny-vit")
    state = ckpt.load_training_state(new, m2, opt2, sched2, scaler2)
    assert state["step"] == 4 and state["extra"] == {"skipped": 2}
    assert _same(m.state_dict(), m2.state_dict()) and _same(opt.state_dict(), opt2.state_dict())
    assert _same(old["rng"], ckpt.rng_state())
    json.dumps(state["extra"])


def test_a_checkpoint_that_cannot_be_written_is_a_checkpoint_error(tmp_path):
    """A 'checkpoints' file (or a full disk) gave a FileExistsError / SafetensorError traceback."""
    import pytest
    import torch

    from fastclip.models import create_model
    from fastclip.train.checkpoint import CheckpointError, save_training_state
    model = create_model("tiny-vit")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot write the checkpoint"):
        save_training_state(str(tmp_path), 1, model, opt, sched, None)


@pytest.mark.parametrize("edit, needle", [
    (lambda o, s, p: o.param_groups[0].__setitem__("lr", "abc"), "lr 'abc' is not a finite number"),
    (lambda o, s, p: o.param_groups[0].__setitem__("betas", "ab"), "betas 'ab' are not finite numbers"),
    (lambda o, s, p: o.state[p].__setitem__("exp_avg", torch.zeros(())), "exp_avg of shape () for a parameter"),
    (lambda o, s, p: s.__setattr__("base_lrs", ["x"] * len(s.base_lrs)), "base_lrs ['x'"),
    (lambda o, s, p: s.__setattr__("last_epoch", "7"), "last_epoch '7' is not an int"),
])
def test_optimizer_state_a_step_cannot_use_is_refused(tmp_path, edit, needle):
    """A planted checkpoint with a string lr failed inside the fused AdamW with a traceback; a
    0-dim Adam moment for the [V, W] embedding was loaded, and the fused CPU kernel then walked
    V·W elements of it (out of bounds)."""
    m, opt, sched, scaler = _setup(0, "tiny-vit")
    _step(m, opt, sched)
    edit(opt, sched, m.token_embedding.weight)
    path = ckpt.save_training_state(str(tmp_path), 1, m, opt, sched, scaler)
    m2, opt2, sched2, scaler2 = _setup(1, "tiny-vit")
    with pytest.raises(ckpt.CheckpointError, match=re.escape(needle)):
        ckpt.load_training_state(path, m2, opt2, sched2, scaler2)


def test_extra_counters_that_are_not_finite_are_refused(tmp_path):
    from types import SimpleNamespace

    from fastclip.train.resume import restore_extra
    t = SimpleNamespace(start_step=3)
    for extra in ({"skipped": float("inf")}, {"wall_time_s": float("inf")}, {"data_position": -1}):
        with pytest.raises(ckpt.CheckpointError, match="corrupt 'extra' entry"):
            restore_extra(t, "ck.safetensors", extra)
    restore_extra(t, "ck.safetensors", {"skipped": 2, "wall_time_s": 5.0})
    assert (t.skipped_before, t.wall_before, t.data_position) == (2, 5.0, 3)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.NAdam(ps),                 # mu_product: a scalar per parameter
    lambda ps: torch.optim.ASGD(ps),                  # eta, mu: scalars
    lambda ps: torch.optim.Adafactor(ps),             # eps (None, 1e-3); factored row_var/col_var
    lambda ps: torch.optim.AdamW(ps, fused=True),
    lambda ps: torch.optim.Adam(ps, amsgrad=True, lr=torch.tensor(1e-3)),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.RMSprop(ps, momentum=0.5, centered=True),
    lambda ps: torch.optim.Rprop(ps),
], ids=["nadam", "asgd", "adafactor", "adamw-fused", "adam-amsgrad-tensor-lr", "sgd", "rmsprop", "rprop"])
def test_every_torch_optimizers_own_state_round_trips(tmp_path, make):
    # The state checks refused fastclip's own checkpoints of NAdam, ASGD and Adafactor (state
    # that is not of its parameter's shape by design, an eps pair).
    _round_trip(tmp_path, make)


def _round_trip(tmp_path, make):
    """One step of a Linear with the optimizer ``make(params)`` builds, saved and loaded into a
    fresh pair, which then steps again; returns the loaded optimizer."""
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = make(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = ckpt.save_training_state(str(tmp_path), 1, m, opt, None, None)
    m2 = torch.nn.Linear(4, 3)
    opt2 = make(m2.parameters())
    ckpt.load_training_state(path, m2, opt2, None, None)
    assert torch.equal(m2.weight, m.weight)
    m2(torch.randn(2, 4)).sum().backward()
    opt2.step()
    return opt2


def test_a_third_party_optimizers_own_hyperparameters_round_trip(tmp_path):
    # transformers' Adafactor keeps lr None (relative steps); Adan and AdEMAMix keep three
    # betas: the state checks called fastclip's own checkpoints of them corrupt.
    class ThreeBetas(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, dict(lr=None, betas=(0.98, 0.92, 0.99), eps=1e-8))

        @torch.no_grad()
        def step(self):
            for g in self.param_groups:
                for p in g["params"]:
                    st = self.state[p]
                    st["exp_avg"] = st.get("exp_avg", torch.zeros_like(p)) * g["betas"][0] + p.grad
                    p.sub_(1e-3 * st["exp_avg"])
    opt2 = _round_trip(tmp_path, ThreeBetas)
    assert opt2.param_groups[0]["betas"] == (0.98, 0.92, 0.99) and opt2.param_groups[0]["lr"] is None


def test_cuda_rng_states_of_more_devices_than_this_node_has_restore_those_it_has(monkeypatch):
    """Under torchrun each rank saves a state per device of its node (8); a resume on a node with
    fewer devices indexed past them (set_rng_state_all), and the IndexError was reported as a
    corrupt checkpoint. No CUDA call: torch.cuda's functions are stood in for."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: calls.append((int(s[0]), i)))
    state = ckpt.rng_state()
    state["cuda"] = [torch.full((8,), k, dtype=torch.uint8) for k in range(8)]
    ckpt.set_rng_state(state)
    assert calls == [(0, 0), (1, 1)]
    calls.clear()
    state["cuda"] = state["cuda"][:1]          # saved on one device, resumed on two: the one it has
    ckpt.set_rng_state(state)
    assert calls == [(0, 0)]


def test_saved_files_are_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes its header's maps in hash-map order, which changes from process to
    process: two runs with bit-equal weights wrote model files whose metadata keys had swapped
    places, so a checksum told them apart. Each process here writes the same model file and
    training state; the bytes must agree (and the files still load)."""
    import hashlib
    import subprocess
    import sys
    code = (
        "import sys, torch\n"
        "from fastclip.models import create_model, save_checkpoint\n"
        "from fastclip.train import checkpoint as ckpt\n"
        "from fastclip.train.optim import create_optimizer\n"
        "import random, numpy\n"
        "random.seed(0); numpy.random.seed(0); torch.manual_seed(0)   # the RNG states it stores\n"
        "m = create_model('tiny-vit')\n"
        "save_checkpoint(m, sys.argv[1] + '/model.safetensors', metadata={f'k{i}': 'v' for i in range(8)})\n"
        "opt = create_optimizer(m, lr=1e-3, weight_decay=0.1)\n"
        "ckpt.save_training_state(sys.argv[1], 3, m, opt, None, None, extra={'a': 1})\n")
    digests = []
    for i in range(3):
        out = tmp_path / f"p{i}"
        out.mkdir()
        subprocess.run([sys.executable, "-c", code, str(out)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(i), "OMP_NUM_THREADS": "1"})
        files = [out / "model.safetensors", out / ckpt.CKPT_DIR / "step_00000003.safetensors"]
        digests.append([hashlib.sha256(f.read_bytes()).hexdigest() for f in files])
    assert digests[0] == digests[1] == digests[2]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "p0" / "model.safetensors"), "pt") as f:
        assert f.metadata()["k7"] == "v" and "fastclip_config" in f.metadata()
    m = create_model("tiny-vit")
    opt = create_optimizer(m, lr=1e-3, weight_decay=0.1)
    state = ckpt.load_training_state(str(tmp_path / "p0" / ckpt.CKPT_DIR / "step_00000003.safetensors"), m, opt,
                                     None, None)
    assert state["step"] == 3
