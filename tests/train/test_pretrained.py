"""``fastclip train --pretrained``: fine-tuning starts from the file's weights and architecture
(a run folder, a training checkpoint, an OpenAI-layout state dict), the sigmoid loss adds a bias,
and what cannot work is refused with a one-line error."""
import os
import subprocess

import pytest
import torch

from fastclip.eval.evaluate import load_model
from fastclip.models import create_model

from ._common import env, fastclip_cmd, run, weights


def _no_model_flag(cmd):
    """The tiny config without its --model (the file gives the architecture)."""
    i = cmd.index("--model")
    return cmd[:i] + cmd[i + 2:]


def _run_pretrained(*args, check=True):
    r = subprocess.run(_no_model_flag(fastclip_cmd(*args)), capture_output=True, text=True, timeout=240, env=env())
    if check:
        assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pre") / "base")
    run(["--steps", "4", "--output", out])
    return out


def test_lr_zero_keeps_the_pretrained_weights_and_checkpoints_rebuild_the_model(base_run, tmp_path):
    """With lr 0 the fine-tuned model is the pretrained one, bit for bit (so training started from
    it); a checkpoint of the run names its architecture, which load_model rebuilds."""
    out = str(tmp_path / "ft")
    r = _run_pretrained("--pretrained", base_run, "--steps", "2", "--lr", "0", "--save-every", "1",
                        "--output", out)
    assert f"from {base_run}" in r.stdout
    a, b = weights(base_run), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ck = load_model(os.path.join(out, "checkpoints", "step_00000001.safetensors"))
    assert all(torch.equal(v, a[k]) for k, v in ck.state_dict().items())


def test_openai_layout_state_dict_gets_a_bias_for_the_sigmoid_loss(tmp_path):
    torch.manual_seed(0)
    src = create_model("tiny-vit", vision_width=128, vision_heads=2, text_width=128, text_heads=2)
    torch.save(src.state_dict(), tmp_path / "openai.pt")
    out = str(tmp_path / "ft")
    _run_pretrained("--pretrained", str(tmp_path / "openai.pt"), "--loss", "siglip", "--steps", "2", "--lr", "0",
                    "--output", out)
    w = weights(out)
    assert w["logit_bias"].item() == pytest.approx(-10.0)
    assert torch.equal(w["logit_scale"], src.state_dict()["logit_scale"])      # the scale is the file's
    assert all(torch.equal(w[k], v) for k, v in src.state_dict().items())


def test_refused_combinations(base_run, tmp_path):
    sig = str(tmp_path / "sig")
    run(["--steps", "2", "--loss", "siglip", "--output", sig])
    r = _run_pretrained("--pretrained", sig, "--loss", "clip", "--output", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "logit_bias" in r.stderr and "--loss siglip" in r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "x" / "model.safetensors")
    r = subprocess.run(fastclip_cmd("--pretrained", base_run, "--output", str(tmp_path / "y")),
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 2 and "drop --model" in r.stderr
    r = _run_pretrained("--pretrained", str(tmp_path / "nope.pt"), check=False)
    assert r.returncode == 2 and "--pretrained" in r.stderr and "no such file" in r.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    r = _run_pretrained("--pretrained", str(tmp_path / "junk.pt"), "--output", str(tmp_path / "z"), check=False)
    assert r.returncode == 2 and "junk.pt" in r.stderr and "Traceback" not in r.stderr


def test_model_overrides_set_what_no_weight_records(tmp_path):
    """With --pretrained, --model-overrides sets only what no weight records (an open_clip model's
    exact GELU or head counts); the weights are the file's, and the run's model keeps the choice."""
    torch.manual_seed(0)
    src = create_model("tiny-vit", vision_width=128, vision_heads=2, text_width=128, text_heads=4, quick_gelu=False)
    torch.save(src.state_dict(), tmp_path / "openai.pt")
    out = str(tmp_path / "ft")
    overrides = '{"quick_gelu": false, "text_heads": 4, "vision_heads": 2}'
    _run_pretrained("--pretrained", str(tmp_path / "openai.pt"), "--steps", "2", "--lr", "0", "--output", out,
                    "--save-every", "1", "--model-overrides", overrides)
    m = load_model(out)
    assert not m.config.quick_gelu and m.config.text_num_heads == 4 and m.config.vision_num_heads == 2
    assert all(torch.equal(m.state_dict()[k], v) for k, v in src.state_dict().items())
    # Resumed without the overrides, the defaults (QuickGELU, width // 64 heads) would load the
    # same tensors: refused, naming what differs and the flag that gives it back.
    r = _run_pretrained("--pretrained", str(tmp_path / "openai.pt"), "--steps", "3", "--output", out,
                        "--resume", "latest", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "another model" in r.stderr and "quick_gelu False (this command: True)" in r.stderr, r.stderr
    assert "text_heads 4 (this command: 2)" in r.stderr and '"quick_gelu": false' in r.stderr, r.stderr
    _run_pretrained("--pretrained", str(tmp_path / "openai.pt"), "--steps", "3", "--output", out, "--resume", "latest",
                    "--model-overrides", '{"quick_gelu": false, "text_heads": 4, "vision_heads": 2}')
    r = _run_pretrained("--pretrained", str(tmp_path / "openai.pt"), "--model-overrides", '{"vision_layers": 2}',
                        "--output", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "the file gives the rest, not vision_layers" in r.stderr
    from fastclip.train.config import TrainConfig, validate_config
    with pytest.raises(ValueError, match="model_overrides .* with pretrained: only what no weight records"):
        validate_config(TrainConfig(pretrained=str(tmp_path / "openai.pt"), model_overrides={"vision_layers": 2}))
