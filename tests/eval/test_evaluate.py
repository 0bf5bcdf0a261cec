"""``fastclip eval`` and fastclip.eval.evaluate: loading every kind of model file, the metrics the
trainer reports (reproduced exactly from a run folder), folder zero-shot, val retrieval, the
linear probe, and one-line errors for bad input."""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.eval.command import main as eval_main
from fastclip.eval.evaluate import encode_images, load_model, probe_metrics

from ..train._common import env, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory):
    """A finished tiny sigmoid-loss demo run with two training checkpoints."""
    out = str(tmp_path_factory.mktemp("evalrun") / "run")
    run(["--steps", "12", "--save-every", "4", "--keep-checkpoints", "2", "--loss", "siglip", "--output", out])
    return out


def _eval(capsys, *args):
    """(exit status, stdout, the last stderr line): argument errors exit through argparse."""
    try:
        code = eval_main([*args, "--threads", "1"])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, (cap.err.strip().splitlines() or [""])[-1] + "\n"


def test_run_folder_reproduces_the_runs_own_zero_shot_numbers(siglip_run, capsys, tmp_path):
    """The demo's final zero-shot numbers come back from the run folder (same model, same held-out
    images for the same seed), and the JSON holds the same values."""
    final = json.load(open(os.path.join(siglip_run, "metrics.json")))
    out_json = str(tmp_path / "m.json")
    code, out, _ = _eval(capsys, siglip_run, "--demo-eval-samples", "32", "--output", out_json)
    assert code == 0, out
    m = json.load(open(out_json))["metrics"]
    for task in ("shape", "color"):
        assert m[f"zeroshot/{task}/top1"] == pytest.approx(final[f"zero_shot_{task}_top1"], abs=1 / 32 + 1e-9)
    assert m["chance/shape"] == pytest.approx(1 / 6) and "zeroshot/shape/top1" in out
    assert json.load(open(out_json))["config"]["init_logit_bias"] is not None   # the sigmoid model's bias


def test_unset_flags_take_the_runs_values(siglip_run, capsys, tmp_path):
    """Without --seed/--batch-size/--demo-eval-samples a run is evaluated as it evaluated itself
    (its config.json: 32 held-out images here, not the default 480); explicit flags win."""
    out_json = str(tmp_path / "m.json")
    code, out, _ = _eval(capsys, os.path.join(siglip_run, "model.safetensors"), "--output", out_json)
    assert code == 0
    assert "config.json: --batch-size 88, --demo-eval-samples 32" in out
    final = json.load(open(os.path.join(siglip_run, "metrics.json")))
    m = json.load(open(out_json))["metrics"]
    assert m["zeroshot/shape/top1"] == pytest.approx(final["zero_shot_shape_top1"], abs=1 / 32 + 1e-9)
    code, out, _ = _eval(capsys, siglip_run, "--seed", "5", "--batch-size", "7", "--demo-eval-samples", "12")
    assert code == 0 and "config.json" not in out


def test_every_kind_of_model_file_loads_the_same_weights(siglip_run, tmp_path):
    """Run folder, model.safetensors, a training checkpoint (rebuilt from its saved run config),
    a folder holding only checkpoints (the newest), and an OpenAI-layout state dict."""
    final = load_model(siglip_run)
    assert not final.training and final.logit_bias is not None
    same = load_model(os.path.join(siglip_run, "model.safetensors"))
    ckpts = sorted(os.listdir(os.path.join(siglip_run, "checkpoints")))
    assert ckpts == ["step_00000004.safetensors", "step_00000008.safetensors"]
    mid = load_model(os.path.join(siglip_run, "checkpoints", ckpts[-1]))
    for k, v in final.state_dict().items():
        assert torch.equal(v, same.state_dict()[k])
    assert any(not torch.equal(v, mid.state_dict()[k]) for k, v in final.state_dict().items())  # step 8 != 12
    only_ckpts = tmp_path / "unfinished"
    (only_ckpts / "checkpoints").mkdir(parents=True)
    for c in ckpts:
        os.link(os.path.join(siglip_run, "checkpoints", c), only_ckpts / "checkpoints" / c)
    newest = load_model(str(only_ckpts))
    assert all(torch.equal(v, mid.state_dict()[k]) for k, v in newest.state_dict().items())
    # A checkpoint copied under another name is known by its header, not its suffix.
    os.link(os.path.join(siglip_run, "checkpoints", ckpts[-1]), tmp_path / "step8.ckpt")
    renamed = load_model(str(tmp_path / "step8.ckpt"))
    assert all(torch.equal(v, mid.state_dict()[k]) for k, v in renamed.state_dict().items())
    # An OpenAI-layout state dict (64-wide heads, as OpenAI's rules infer them).
    from fastclip.models import create_model
    m = create_model("tiny-vit", vision_width=128, vision_heads=2, text_width=128, text_heads=2)
    torch.save(m.state_dict(), tmp_path / "openai.pt")
    o = load_model(str(tmp_path / "openai.pt"))
    img = torch.randn(2, 3, 32, 32)
    assert torch.allclose(o.encode_image(img), m.eval().encode_image(img), atol=1e-6)


def _folder(root, classes, n, seed, corrupt=False):
    """Class folders of solid-colour 40x40 images with noise (class k: colour k)."""
    rng = np.random.default_rng(seed)
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            arr = np.clip(np.array(colours[k]) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG not really")
    return str(root)


def test_folder_zero_shot_val_retrieval_and_probe(siglip_run, capsys, tmp_path):
    zs = _folder(tmp_path / "zs", ["red", "blue"], 3, 0, corrupt=True)
    tr = _folder(tmp_path / "tr", ["red", "blue", "green"], 8, 1)
    te = _folder(tmp_path / "te", ["red", "blue", "green"], 4, 2)
    rows = ["filepath,title"] + [f"zs/{c}/{i}.png,a {c} square" for c in ("red", "blue") for i in range(3)]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\nmissing.png,gone\n")
    out_json = str(tmp_path / "m.json")
    code, out, err = _eval(capsys, siglip_run, "--zeroshot-data", zs, "--val-data", str(tmp_path / "val.csv"),
                           "--probe-train", tr, "--probe-test", te, "--output", out_json)
    assert code == 0, err
    m = json.load(open(out_json))["metrics"]
    assert "zeroshot/shape/top1" not in m                       # data given: no default --shapes
    assert 0 <= m["zeroshot/zs/top1"] <= 1 and m["chance/zs"] == 0.5
    assert m["val/n"] == 6 and np.isfinite(m["val/loss"]) and 0 <= m["val/mean_recall"] <= 1
    assert m["probe/n_train"] == 24 and m["probe/n_test"] == 12
    assert m["probe/top1"] >= 0.9          # three colours, linearly separable in any image embedding
    assert m["skipped"] == 2               # the corrupt zero-shot image and the missing val image
    assert "probe/top1" in out and "val/mean_recall" in out


def test_probe_metrics_and_encode_images_directly():
    from fastclip.models import create_model
    torch.manual_seed(0)
    model = create_model("tiny-vit").eval()
    x = torch.randn(5, 3, 32, 32)
    e = encode_images(model, x, batch_size=2)
    assert e.shape == (5, 64) and torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(e, encode_images(model, x, batch_size=5), atol=1e-6)
    y = torch.tensor([0, 1, 0, 1, 0])
    r = probe_metrics(e, y, e, y)
    assert set(r) == {"probe/top1", "probe/C", "probe/val_top1", "probe/n_train", "probe/n_test"}
    # NumPy features, as linear_probe takes them ('ndarray' object has no attribute 'float')
    assert probe_metrics(e.numpy(), y.numpy(), e.numpy(), y.numpy()) == r
    with pytest.raises(TypeError, match="test_features must be a tensor"):
        probe_metrics(e, y, "features", y)
    # Class names as a generator: the classifier read it, then len() of it failed for chance/.
    from fastclip.eval.evaluate import zeroshot_metrics
    m = zeroshot_metrics(model, {"t": (x, torch.tensor([0, 1, 2, 1, 0]), (c for c in "abc"), ["{}"])})
    assert m["chance/t"] == pytest.approx(1 / 3)


def test_batch_size_must_be_a_positive_int():
    """range(0, N, -2) is empty: a negative batch size returned [0, 64] embeddings, and 0
    failed with range()'s own message."""
    from fastclip.eval.evaluate import FolderStream, folder_zeroshot_metrics, zeroshot_metrics
    from fastclip.models import create_model
    torch.manual_seed(0)
    model = create_model("tiny-vit").eval()
    x = torch.randn(3, 3, 32, 32)
    for bs in (-2, 0):
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bs}"):
            encode_images(model, x, batch_size=bs)
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bs}"):
            zeroshot_metrics(model, {"t": (x, torch.tensor([0, 1, 0]), ["a", "b"], ["{}"])}, batch_size=bs)
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bs}"):
            folder_zeroshot_metrics(model, None, "t", ["{}"], batch_size=bs)
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bs}"):
            FolderStream([], bs)
    with pytest.raises(TypeError, match="batch_size must be a positive int, got float 2.0"):
        encode_images(model, x, batch_size=2.0)


def test_bad_arguments_exit_2_naming_the_flag(siglip_run, capsys, tmp_path):
    os.mkfifo(tmp_path / "pipe.pt")
    cases = [
        ([str(tmp_path / "nope")], "no such file or folder"),
        ([str(tmp_path / "pipe.pt")], "pipe.pt: not a regular file or a folder"),
        ([siglip_run, "--probe-train", str(tmp_path)], "--probe-train and --probe-test go together"),
        ([siglip_run, "--zeroshot-data", str(tmp_path / "nope")], "--zeroshot-data"),
        ([siglip_run, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
        ([siglip_run, "--device", "tpu"], "--device"),
        ([siglip_run, "--output", str(tmp_path)], "a folder; expected a file name"),
        ([siglip_run, "--output", str(tmp_path / "new") + os.sep], "a folder; expected a file name"),
        ([siglip_run, "--val-data", str(tmp_path / "nope.csv")], "file not found"),
        ([siglip_run, "--loss-backend", "nope"], "--loss-backend 'nope': unknown"),
    ]
    for args, needle in cases:
        with pytest.raises(SystemExit) as e:
            eval_main(args)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err, args


def test_unusable_files_are_one_line_errors(siglip_run, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    for path, needle in ((tmp_path / "notes.txt", "notes.txt"), (tmp_path / "empty", "without model.safetensors")):
        code, _, err = _eval(capsys, str(path))
        assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    bad = tmp_path / "mixed"
    _folder(bad / "a", ["red", "blue"], 1, 0)
    _folder(bad / "b", ["red", "green"], 1, 0)
    code, _, err = _eval(capsys, siglip_run, "--probe-train", str(bad / "a"), "--probe-test", str(bad / "b"))
    assert code == 2 and "same class folders" in err


def test_command_line_entry_point(siglip_run, tmp_path):
    # --output /dev/stdout with stdout a pipe: the link resolves to "/proc/…/fd/pipe:[…]", which
    # no open() reaches (it was refused as "cannot write in '/proc/…/fd'").
    r = subprocess.run([sys.executable, "-m", "fastclip", "eval", siglip_run, "--demo-eval-samples", "16",
                        "--threads", "1", "--output", "/dev/stdout"], capture_output=True, text=True,
                       timeout=120, env=env())
    assert r.returncode == 0, r.stderr
    # stdout holds the JSON alone (the summary table beside it made it unparseable): the table
    # goes to stderr
    doc = json.loads(r.stdout)
    assert "zeroshot/mean_top1" in doc["metrics"] and "zeroshot/mean_top1" in r.stderr
    # stdout redirected (appending) to a file: the file keeps what was there and gets the JSON
    # (it was replaced by the JSON alone, the rest written to the unlinked file).
    log = tmp_path / "log.txt"
    log.write_text("before\n")
    with open(log, "a") as f:
        r = subprocess.run([sys.executable, "-m", "fastclip", "eval", siglip_run, "--demo-eval-samples", "16",
                            "--threads", "1", "--output", "/dev/stdout"], stdout=f, stderr=subprocess.PIPE,
                           text=True, timeout=120, env=env())
    assert r.returncode == 0, r.stderr
    text = log.read_text()
    assert text.startswith("before\n{") and json.loads(text[len("before\n"):])["metrics"], text
    assert "zeroshot/mean_top1" in r.stderr


def test_output_never_replaces_a_link_a_fifo_or_an_input(siglip_run, capsys, tmp_path):
    """--output goes through the file a symbolic link names (the link stays), is written in place
    into a FIFO (a rename would replace the node: /dev/null became a regular file), and may not
    be one of the inputs; an unusable --output is refused before the model is loaded."""
    import threading

    from fastclip._fileio import atomic_write
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    code, _, _ = _eval(capsys, siglip_run, "--output", str(link))
    assert code == 0 and link.is_symlink() and "metrics" in json.loads(target.read_text())
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    atomic_write(str(fifo), lambda p: open(p, "w").write("hello"))
    reader.join(timeout=30)
    assert got == [b"hello"] and __import__("stat").S_ISFIFO(os.stat(fifo).st_mode)
    model_file = os.path.join(siglip_run, "model.safetensors")
    for bad, needle in ((model_file, "one of the inputs"), ("", "expected a file name"),
                        (str(tmp_path / "no" / "x.json"), "does not exist")):
        with pytest.raises(SystemExit) as e:
            eval_main([siglip_run, "--output", bad])
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert load_model(model_file) is not None            # untouched


def test_probe_fits_in_fp32_under_autocast():
    """The probe's logistic regression runs with autocast off: fitted in bf16 it lands at chance."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g)
    y = torch.arange(60) % 3
    x = centers[y] + 0.1 * torch.randn(60, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = probe_metrics(x, y, x, y)
    assert r["probe/top1"] == 1.0


def test_run_folder_prefers_a_checkpoint_of_a_later_step_than_its_model_file(siglip_run, tmp_path):
    """A finished run resumed for more steps and stopped before its end: its model.safetensors is
    the earlier end's (step 4 here), the checkpoint of step 8 the newer model. The steps decide,
    not the files' times (a copy does not keep those)."""
    import shutil

    from fastclip.eval.evaluate import resolve_model_file
    from fastclip.models import save_checkpoint
    run = tmp_path / "resumed"
    shutil.copytree(siglip_run, run)
    ckpts = sorted((run / "checkpoints").iterdir())
    model_file = run / "model.safetensors"
    os.utime(ckpts[-1], (1_000_000, 1_000_000))                  # the checkpoint looks older ...
    assert resolve_model_file(str(run)) == str(model_file)       # ... and is: step 8 < step 12
    save_checkpoint(load_model(str(model_file)), model_file, metadata={"fastclip_step": "4"})
    assert resolve_model_file(str(run)) == str(ckpts[-1])        # step 8 > the model file's 4
    os.unlink(model_file)
    assert resolve_model_file(str(run)) == str(ckpts[-1])


def test_models_fastclip_cannot_feed_are_refused(capsys, tmp_path):
    """A vocabulary smaller than the tokenizer's (a traceback inside the text tower before), and an
    earlier-format training checkpoint (its model was inferred with the wrong head counts)."""
    from fastclip.models import create_model, save_checkpoint
    small = tmp_path / "smallvocab.safetensors"
    save_checkpoint(create_model("tiny-vit", vocab_size=1000), small)
    code, _, err = _eval(capsys, str(small))
    assert code == 2 and "vocab_size 1000" in err and "Traceback" not in err
    other = tmp_path / "worldwide.safetensors"      # pools at another tokenizer's eos id
    save_checkpoint(create_model("tiny-vit", vocab_size=60000, text_eos_id=2), other)
    code, _, err = _eval(capsys, str(other))
    assert code == 2 and "pools at token id 2 (text_eos_id)" in err and "Traceback" not in err
    legacy = tmp_path / "step_00000005.pt"
    torch.save({"step": 5, "model": create_model("tiny-vit").state_dict(), "optimizer": {}, "extra": {}}, legacy)
    code, _, err = _eval(capsys, str(legacy))
    assert code == 2 and "convert_legacy_checkpoint" in err


def test_a_real_data_runs_own_evaluation_data_is_the_default(tmp_path, capsys):
    """Without data flags a run that trained on a CSV is evaluated on its own --val-data and
    --zeroshot-data (with its --val-num-samples), not on the built-in shapes; a FIFO in a class
    folder is not read; a folder task named like a built-in one gets its own name."""
    zs = _folder(tmp_path / "color", ["red", "blue"], 3, 0)
    os.mkfifo(tmp_path / "color" / "red" / "pipe.png")
    rows = ["filepath,title"] + [f"color/{c}/{i}.png,a {c} square" for c in ("red", "blue") for i in range(3)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "run")
    run(["--train-data", str(tmp_path / "data.csv"), "--val-data", str(tmp_path / "data.csv"),
         "--val-num-samples", "4", "--zeroshot-data", zs, "--batch-size", "3", "--steps", "2", "--output", out])
    final = json.load(open(os.path.join(out, "metrics.json")))
    out_json = str(tmp_path / "m.json")
    code, text, err = _eval(capsys, out, "--output", out_json)
    assert code == 0, err
    m = json.load(open(out_json))["metrics"]
    assert "zeroshot/shape/top1" not in m and m["val/n"] == 4
    assert m["val/loss"] == pytest.approx(final["val/loss"], rel=1e-5)
    assert m["zeroshot/color/top1"] == pytest.approx(final["zero_shot_color_top1"])
    code, _, _ = _eval(capsys, out, "--shapes", "--zeroshot-data", zs, "--output", out_json)
    m = json.load(open(out_json))["metrics"]
    assert code == 0 and "zeroshot/color-folder/top1" in m and m["chance/color"] == 1 / 8


def test_closed_stdout_keeps_the_json(siglip_run, tmp_path):
    out_json = tmp_path / "m.json"
    p = subprocess.Popen([sys.executable, "-m", "fastclip", "eval", siglip_run, "--threads", "1", "--output",
                          str(out_json)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    p.stdout.close()                   # as `| head -0` would
    _, err = p.communicate(timeout=120)
    assert p.returncode in (0, 141), err
    assert b"Traceback" not in err and "metrics" in json.loads(out_json.read_text())


def test_run_paths_resolve_from_where_the_run_started(tmp_path, capsys, monkeypatch):
    """A run's relative --zeroshot-data/--val-data/--zeroshot-classes are read from the folder
    it was started in (config.json's cwd), whatever folder eval runs in; its class names go
    with its own folder only."""
    started = tmp_path / "started"
    started.mkdir()
    _folder(started / "zs", ["red", "blue"], 2, 0)
    (started / "names.txt").write_text("crimson thing\nnavy thing\n")
    monkeypatch.chdir(started)
    run(["--steps", "2", "--zeroshot-data", "zs", "--zeroshot-classes", "names.txt", "--output", "run"])
    elsewhere = tmp_path / "elsewhere"
    _folder(elsewhere / "zs", ["a", "b", "c"], 1, 1)       # another folder of the same name
    monkeypatch.chdir(elsewhere)
    out_json = str(tmp_path / "m.json")
    code, text, err = _eval(capsys, str(started / "run"), "--output", out_json)
    assert code == 0, err
    m = json.load(open(out_json))["metrics"]
    assert m["chance/zs"] == 0.5 and f"--zeroshot-data {started / 'zs'}" in text and "names.txt" in text
    code, text, err = _eval(capsys, str(started / "run"), "--zeroshot-data", str(elsewhere / "zs"), "--output",
                            out_json)
    assert code == 0, err
    assert json.load(open(out_json))["metrics"]["chance/zs"] == 1 / 3 and "names.txt" not in text


def test_output_may_not_land_in_the_runs_files_or_the_data(siglip_run, capsys, tmp_path):
    zs = _folder(tmp_path / "zs", ["red", "blue"], 1, 0)
    for bad in (os.path.join(siglip_run, "config.json"), os.path.join(siglip_run, "metrics.json"),
                os.path.join(siglip_run, "metrics.jsonl"),          # the training log
                os.path.join(siglip_run, "checkpoints", "x.json"), os.path.join(zs, "red", "0.png"),
                os.path.join(zs, "new.json")):
        code, _, err = _eval(capsys, siglip_run, "--zeroshot-data", zs, "--output", bad)
        assert code == 2 and "one of the inputs" in err, bad
    code, _, err = _eval(capsys, siglip_run, "--output", os.path.join(siglip_run, "eval.json"))
    assert code == 0, err                                  # beside the run's files is fine


def test_output_may_not_be_a_shard_of_a_pattern_or_an_image_of_the_csv(siglip_run, capsys, tmp_path):
    """--output was compared with --val-data as typed: a brace pattern's shard and an image the
    CSV lists were replaced by the JSON (status 0); the CSV's columns are checked before the
    model is loaded, naming the flag."""
    import tarfile
    zs = _folder(tmp_path / "imgs", ["red", "blue"], 2, 0)
    rows = [(f"imgs/{c}/{i}.png", f"a {c} square") for c in ("red", "blue") for i in range(2)]
    (tmp_path / "val.csv").write_text("filepath,title\n" + "".join(f"{a},{b}\n" for a, b in rows))
    (tmp_path / "shards").mkdir()
    for k in range(2):
        with tarfile.open(tmp_path / "shards" / f"{k:03d}.tar", "w") as tar:
            for j, (img, cap) in enumerate(rows[2 * k:2 * k + 2]):
                tar.add(os.path.join(tmp_path, img), f"s{k}{j}.png")
                data = cap.encode()
                info = tarfile.TarInfo(f"s{k}{j}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shard = tmp_path / "shards" / "001.tar"
    before = shard.read_bytes()
    for val, out in ((str(tmp_path / "shards" / "{000..001}.tar"), str(shard)),
                     (f"{tmp_path / 'shards' / '000.tar'}::{shard}", str(shard)),
                     (str(tmp_path / "val.csv"), os.path.join(zs, "blue", "1.png"))):
        code, _, err = _eval(capsys, siglip_run, "--val-data", val, "--output", out)
        assert code == 2 and "one of the inputs" in err, (val, out, err)
    assert shard.read_bytes() == before and Image.open(os.path.join(zs, "blue", "1.png")).size == (40, 40)
    code, _, err = _eval(capsys, siglip_run, "--val-data", str(tmp_path / "val.csv"), "--csv-img-key", "path")
    assert code == 2 and f"--val-data {str(tmp_path / 'val.csv')!r}: column 'path' (--csv-img-key) not found; " \
        "columns are ['filepath', 'title'] (separator ',')" in err, err
    code, _, err = _eval(capsys, siglip_run, "--val-data", str(tmp_path / "val.csv"), "--output",
                         str(tmp_path / "eval.json"))
    assert code == 0, err


def test_a_runs_list_of_shards_resolves_each_from_where_the_run_started():
    """Only the first of 'a.tar::b.tar' was joined to the run's folder: the second was read from
    the current one (missing there: the data evaluated in part)."""
    from fastclip.eval.command import _run_path
    assert _run_path("d/a.tar::d/b.tar", "/runs", shards=True) == "/runs/d/a.tar::/runs/d/b.tar"
    assert _run_path("/abs/a.tar::d/{0..1}.tar", "/runs", shards=True) == "/abs/a.tar::/runs/d/{0..1}.tar"
    assert _run_path("d/a.tar::d/b.tar", None, shards=True) == "d/a.tar::d/b.tar"
    # '::' in a name is no list: a folder's path (or one that exists whole) stays as it is
    assert _run_path("/abs/imgs::v2", "/runs") == "/abs/imgs::v2"
    assert _run_path("zs::v2", "/runs") == "/runs/zs::v2"


def test_unreadable_run_config_is_said_and_fifos_are_not_read(siglip_run, capsys, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(siglip_run, run_dir)
    (run_dir / "config.json").write_text("{not json")
    code, out, _ = _eval(capsys, str(run_dir))
    assert code == 0 and "config.json is unreadable" in out and "settings are not applied" in out
    os.unlink(run_dir / "config.json")
    os.mkfifo(run_dir / "config.json")
    code, out, _ = _eval(capsys, str(run_dir))             # a FIFO would block: not opened
    assert code == 0 and "not a regular file" in out
    os.mkfifo(tmp_path / "p.png")
    (tmp_path / "v.csv").write_text("filepath,title\np.png,a pipe\n" + "".join(
        f"{os.path.join(tmp_path, 'zs', 'red', f'{i}.png')},a red square\n" for i in range(2)))
    _folder(tmp_path / "zs", ["red"], 2, 0)
    code, _, err = _eval(capsys, str(run_dir), "--val-data", str(tmp_path / "v.csv"))
    assert code == 0, err


def test_the_runs_batch_size_groups_the_val_loss_not_the_forwards(siglip_run, capsys, monkeypatch):
    """A run's per-rank batch of thousands would be one forward of thousands of images: images go
    through the encoder 256 at a time unless --batch-size is given."""
    import fastclip.eval.command as C
    seen = []
    real = C.fill_defaults

    def spy(args, log=print):
        real(args, log)
        seen.append((args.batch_size, args.encode_batch_size))
    monkeypatch.setattr(C, "fill_defaults", spy)
    code, _, _ = _eval(capsys, siglip_run)
    code2, _, _ = _eval(capsys, siglip_run, "--batch-size", "1000")
    assert code == code2 == 0 and seen == [(88, 256), (1000, 1000)]


class _OneHot(torch.nn.Module):
    """A perfect stand-in model: image and caption features are the given one-hot rows."""

    def forward(self, imgs, toks, normalize=False):
        return imgs.float(), toks.float(), torch.tensor(10.0)

    def parameters(self, recurse=True):
        return iter([torch.zeros(1)])


def test_val_recall_counts_rows_of_one_image_as_its_captions():
    """A COCO-style val CSV lists each image once per caption. Without image ids the copies tie
    and only the first can rank first (a perfect model scored R@1 0.5); with them each image is
    one candidate with several captions."""
    from fastclip.eval.evaluate import val_metrics
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3])          # 4 images, 7 caption rows
    rows = torch.eye(4)[ids]                            # [7, 4]
    batches = [(rows[:4], rows[:4], ids[:4]), (rows[4:], rows[4:], ids[4:])]
    got = val_metrics(_OneHot(), batches)
    assert got["val/n"] == 7
    assert got["val/image_to_text_R@1"] == 1.0 and got["val/text_to_image_R@1"] == 1.0
    plain = val_metrics(_OneHot(), [b[:2] for b in batches])
    assert plain["val/text_to_image_R@1"] == pytest.approx(4 / 7)


def test_val_batches_give_repeated_images_one_id(tmp_path):
    from fastclip.train import TrainConfig
    from fastclip.train.data import load_val_batches
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    (tmp_path / "val.csv").write_text("filepath,title\n" + "".join(
        f"{k}.png,caption {j} of image {k}\n" for k in (0, 1, 2) for j in range(2)) + "0.png,once more\n")

    class M:
        image_size, context_length = 16, 12
    batches, skipped = load_val_batches(TrainConfig(val_data=str(tmp_path / "val.csv"), batch_size=4), M())
    assert skipped == 0 and torch.cat([b[2] for b in batches]).tolist() == [0, 0, 1, 1, 2, 2, 0]


def test_val_images_are_files_not_pixels_after_the_crop(tmp_path):
    """Two files that differ only where the centre crop cuts (a tall image's top rows) were one
    image: ids came from the transformed pixels. A file is an image (CSV: by path, so a missing
    middle row shifts nothing; shards: by bytes)."""
    import tarfile

    from fastclip.train import TrainConfig
    from fastclip.train.data import load_val_batches
    a = np.full((120, 40, 3), 128, dtype=np.uint8)
    a[50:70, 10:30] = (255, 0, 0)
    b = a.copy()
    b[:15] = (0, 0, 255)                                # outside the 40 x 40 centre crop
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    (tmp_path / "val.csv").write_text("filepath,title\na.png,a red square\nmissing.png,gone\n"
                                      "b.png,a red square under a blue band\n./a.png,the same file\n")

    class M:
        image_size, context_length = 16, 12
    batches, skipped = load_val_batches(TrainConfig(val_data=str(tmp_path / "val.csv"), batch_size=4), M())
    assert skipped == 1 and torch.cat([b[2] for b in batches]).tolist() == [0, 1, 0]
    assert torch.equal(batches[0][0][0], batches[0][0][1])      # equal pixels, two images

    shard = tmp_path / "val-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, name in (("s0", "a.png"), ("s1", "b.png"), ("s2", "a.png")):
            for ext, data in (("png", (tmp_path / name).read_bytes()), ("txt", key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    batches, skipped = load_val_batches(TrainConfig(val_data=str(shard), batch_size=2), M())
    assert skipped == 0 and torch.cat([b[2] for b in batches]).tolist() == [0, 1, 0]
    # Shard paths that do not exist were left out without a word (training names them).
    notes = []
    load_val_batches(TrainConfig(val_data=f"{shard}::{tmp_path / 'nope.tar'}", batch_size=2), M(), log=notes.append)
    assert any("1 of the 2 shard paths named do not exist" in n and "nope.tar" in n for n in notes), notes


def test_val_metrics_run_in_eval_mode():
    """val_metrics ran the model in its own mode: a ResNet left in train mode gave
    batch-statistics features and overwrote its running statistics."""
    from fastclip.eval.evaluate import val_metrics
    from fastclip.models import create_model
    from fastclip.tokenizer import tokenize
    torch.manual_seed(0)
    rn = create_model("tiny-rn")
    s = rn.config.image_size
    imgs, toks = torch.randn(6, 3, s, s), tokenize(["a red circle"] * 6, context_length=rn.config.context_length)
    stats = {k: v.clone() for k, v in rn.state_dict().items() if "running" in k}
    assert rn.training
    got = val_metrics(rn, [(imgs, toks)])
    assert rn.training and all(torch.equal(rn.state_dict()[k], v) for k, v in stats.items())
    rn.eval()
    assert val_metrics(rn, [(imgs, toks)])["val/loss"] == pytest.approx(got["val/loss"], rel=1e-6)
    # The sigmoid loss of a model without a bias scored with bias 0, silently.
    with pytest.raises(ValueError, match="loss 'siglip': the model has no logit_bias"):
        val_metrics(rn, [(imgs, toks)], loss="siglip")


def test_options_for_data_that_is_not_evaluated_are_refused(siglip_run, capsys, tmp_path):
    """Options typed for data that is not evaluated were ignored: --zeroshot-templates without
    --zeroshot-data reported the built-in shapes numbers, --csv-img-key with shards read them as
    shards. They are refused before the model is loaded, as fastclip train refuses them."""
    zs = _folder(tmp_path / "zs", ["red", "blue"], 1, 0)
    import tarfile
    shard = tmp_path / "shard0.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(os.path.join(zs, "red", "0.png"), "0.png")
        (tmp_path / "0.txt").write_text("a red square")
        tar.add(tmp_path / "0.txt", "0.txt")
    cases = [
        ([siglip_run, "--zeroshot-templates", "cifar"], "--zeroshot-templates makes the prompts of --zeroshot-data"),
        ([siglip_run, "--zeroshot-classes", "a,b"], "--zeroshot-classes names the classes of --zeroshot-data"),
        ([siglip_run, "--val-data", str(shard), "--csv-img-key", "x"],
         "--csv-img-key reads CSV files, and --val-data"),
        ([siglip_run, "--val-data", str(shard), "--csv-caption-key", "t", "--csv-separator", ";"],
         "drop --csv-caption-key and --csv-separator"),
        ([siglip_run, "--csv-separator", ";"], "there is no --val-data"),
        ([siglip_run, "--val-num-samples", "3"], "--val-num-samples caps the samples of --val-data"),
        ([siglip_run, "--dataset-type", "csv"], "--dataset-type tells --val-data's type"),
        ([siglip_run, "--zeroshot-data", zs, "--demo-eval-samples", "5"], "pass --shapes too"),
        # --loss and --loss-backend choose the val loss: without --val-data they did nothing
        ([siglip_run, "--loss", "clip"], "--loss chooses how --val-data's loss is computed"),
        ([siglip_run, "--shapes", "--loss-backend", "reference"], "drop --loss-backend"),
        # a file named .csv was read as CSV, without a word, whatever --dataset-type said
        ([siglip_run, "--val-data", str(tmp_path / "val.csv"), "--dataset-type", "webdataset"],
         "--dataset-type webdataset: --val-data"),
    ]
    (tmp_path / "val.csv").write_text("path;caption\n" + "".join(f"zs/{c}/0.png;a {c} square\n"
                                                                 for c in ("red", "blue")))
    for args, needle in cases:
        with pytest.raises(SystemExit) as e:
            eval_main([*args, "--threads", "1"])
        assert e.value.code == 2
        assert needle in capsys.readouterr().err, args
    # With the data they shape, they are taken.
    code, _, err = _eval(capsys, siglip_run, "--zeroshot-data", zs, "--zeroshot-templates", "simple",
                         "--zeroshot-classes", "crimson,navy", "--val-data", str(tmp_path / "val.csv"),
                         "--csv-img-key", "path", "--csv-caption-key", "caption", "--csv-separator", ";",
                         "--shapes", "--demo-eval-samples", "12", "--loss", "clip", "--loss-backend", "reference",
                         "--dataset-type", "csv")
    assert code == 0, err


def test_a_class_folder_without_images_is_refused(siglip_run, capsys, tmp_path):
    """An empty class folder was a class: chance 1/(k+1), and a class no image could be right
    for. Refused (as torchvision's ImageFolder refuses it), naming the folder, for the zero-shot
    and the probe folders alike; a folder of non-images is as empty."""
    zs = _folder(tmp_path / "zs", ["red", "blue"], 2, 0)
    (tmp_path / "zs" / "green").mkdir()
    (tmp_path / "zs" / "grey").mkdir()
    (tmp_path / "zs" / "grey" / "notes.txt").write_text("no image")
    code, _, err = _eval(capsys, siglip_run, "--zeroshot-data", zs)
    assert code == 2 and "--zeroshot-data" in err and "class folder(s) with no image file" in err
    assert os.path.join(zs, "green") in err and os.path.join(zs, "grey") in err and "Traceback" not in err
    tr = _folder(tmp_path / "tr", ["red", "blue"], 2, 1)
    te = _folder(tmp_path / "te", ["red", "blue"], 2, 2)
    for f in os.listdir(os.path.join(te, "blue")):
        os.unlink(os.path.join(te, "blue", f))
    code, _, err = _eval(capsys, siglip_run, "--probe-train", tr, "--probe-test", te)
    assert code == 2 and "--probe-test" in err and os.path.join(te, "blue") in err


def test_images_below_a_class_folder_are_read_at_any_depth(siglip_run, capsys, tmp_path):
    """red/sub/x.png was left out of class red (a class whose images were all in sub-folders
    counted as a class without images); images at any depth below a class folder are its images,
    in the sorted order of their paths, hidden folders left out."""
    from fastclip.datasets.folder import scan_class_folders
    tr = _folder(tmp_path / "tr", ["red", "blue"], 2, 1)
    _folder(tmp_path / "tr" / "red", ["sub"], 2, 3)               # red/sub/0.png, red/sub/1.png
    _folder(tmp_path / "tr" / "blue" / "deep", ["er"], 1, 4)     # blue/deep/er/0.png
    _folder(tmp_path / "tr" / "blue", [".ipynb_checkpoints"], 1, 5)
    scan = scan_class_folders(tr)
    assert scan.classnames == ["blue", "red"]
    assert [(os.path.relpath(p, tr), k) for p, k in scan.samples] == [
        ("blue/0.png", 0), ("blue/1.png", 0), ("blue/deep/er/0.png", 0),
        ("red/0.png", 1), ("red/1.png", 1), ("red/sub/0.png", 1), ("red/sub/1.png", 1)]
    only_nested = _folder(tmp_path / "zs" / "green", ["a"], 2, 6)
    _folder(tmp_path / "zs" / "red", ["b"], 2, 7)
    out_json = str(tmp_path / "m.json")
    code, _, err = _eval(capsys, siglip_run, "--zeroshot-data", os.path.dirname(only_nested), "--probe-train", tr,
                         "--probe-test", tr, "--output", out_json)
    assert code == 0, err
    m = json.load(open(out_json))["metrics"]
    assert m["probe/n_train"] == m["probe/n_test"] == 7 and m["chance/zs"] == 0.5


def test_zeroshot_classes_naming_a_folder_is_refused(siglip_run, capsys, tmp_path, monkeypatch):
    """--zeroshot-classes naming a folder was read as one class name ("1 class names given for
    2 class folders"): it expects a file or a comma-separated list."""
    zs = _folder(tmp_path / "zs", ["red", "blue"], 1, 0)
    (tmp_path / "names").mkdir()
    monkeypatch.chdir(tmp_path)
    for value in ("names", str(tmp_path / "names")):
        code, _, err = _eval(capsys, siglip_run, "--zeroshot-data", zs, "--zeroshot-classes", value)
        assert code == 2 and f"--zeroshot-classes {value!r}: a folder; expected a file" in err, err
    code, _, err = _eval(capsys, siglip_run, "--zeroshot-data", zs, "--zeroshot-classes", "one")
    assert code == 2 and "1 class names given for the 2 class folders of --zeroshot-data" in err


def test_single_class_probes_are_refused_and_tiny_ones_warned_of(siglip_run, capsys, tmp_path):
    """A probe of one class scored 100% whatever the model, and one of 2 images 0, 50 or 100%,
    without a word: the first is refused, the second is reported with a warning giving its
    image counts."""
    one = _folder(tmp_path / "one", ["red"], 3, 0)
    code, _, err = _eval(capsys, siglip_run, "--probe-train", one, "--probe-test", one)
    assert code == 2 and "--probe-train" in err and "at least 2 classes" in err
    tiny = _folder(tmp_path / "tiny", ["red", "blue"], 1, 0)
    code, out, err = _eval(capsys, siglip_run, "--probe-train", tiny, "--probe-test", tiny)
    assert code == 0 and "probe/top1" in out
    assert "warning: the linear probe used 2 training and 2 test images (2 classes)" in err
    assert "warning" not in out
    # Two class folders, but every image of one fails to decode: one class is left to fit.
    bad = _folder(tmp_path / "bad", ["red", "blue"], 2, 0)
    for f in ("0.png", "1.png"):
        (tmp_path / "bad" / "blue" / f).write_bytes(b"\x89PNG not really")
    code, _, err = _eval(capsys, siglip_run, "--probe-train", bad, "--probe-test", tiny)
    assert code == 2 and "--probe-train/--probe-test" in err and "a single class" in err


def test_fp16_autocast_runs_on_a_cpu_as_in_training(siglip_run, capsys, tmp_path):
    """fastclip train takes --precision fp16 on a CPU (autocast, as bf16); eval refused it ("needs a
    GPU") and evaluated such a run in fp32, so it could not reproduce the run's own numbers."""
    out_json = str(tmp_path / "m.json")
    code, out, err = _eval(capsys, siglip_run, "--demo-eval-samples", "16", "--precision", "fp16",
                           "--output", out_json)
    assert code == 0, err
    m = json.load(open(out_json))["metrics"]
    assert 0.0 <= m["zeroshot/shape/top1"] <= 1.0


def test_val_loss_is_not_diluted_by_batches_of_one_pair(tmp_path):
    """The softmax loss of one pair is exactly 0: a last batch of one sample (17 samples in
    batches of 8), or --batch-size 1, pulled val/loss down (to 16/17 of its value, or to 0)."""
    from fastclip.eval.evaluate import val_metrics
    from fastclip.train import TrainConfig
    from fastclip.train.data import load_val_batches
    rng = np.random.default_rng(0)
    for k in range(17):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    (tmp_path / "val.csv").write_text("filepath,title\n" + "".join(f"{k}.png,caption {k}\n" for k in range(17)))

    class M:
        image_size, context_length = 16, 12
    for bs, sizes in ((8, [8, 9]), (1, [2] * 7 + [3])):
        batches, _ = load_val_batches(TrainConfig(val_data=str(tmp_path / "val.csv"), batch_size=bs), M())
        assert [len(b[0]) for b in batches] == sizes
    rows = torch.eye(4)
    got = val_metrics(_OneHot(), [(rows[:3], rows[:3] * 0.5), (rows[3:], rows[3:] * 0.5)])
    alone = val_metrics(_OneHot(), [(rows[:3], rows[:3] * 0.5)])
    assert got["val/loss"] == pytest.approx(alone["val/loss"]) and got["val/n"] == 4
    assert math.isnan(val_metrics(_OneHot(), [(rows[:1], rows[:1])])["val/loss"])


def test_fastclip_backend_matters_to_the_val_loss_alone(siglip_run, capsys, monkeypatch, tmp_path):
    """FASTCLIP_BACKEND naming a backend this machine lacks stopped a zero-shot evaluation,
    which computes no loss; with --val-data (or a bad --loss-backend given) it is refused."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("the CUDA backend is available here")
    monkeypatch.setenv("FASTCLIP_BACKEND", "cuda")
    code, out, _ = _eval(capsys, siglip_run, "--demo-eval-samples", "16")
    assert code == 0 and "zeroshot/mean_top1" in out
    (tmp_path / "val.csv").write_text("filepath,title\na.png,a cat\n")
    code, _, err = _eval(capsys, siglip_run, "--val-data", str(tmp_path / "val.csv"))
    assert code == 2 and "--loss-backend auto takes FASTCLIP_BACKEND='cuda'" in err
    monkeypatch.delenv("FASTCLIP_BACKEND")
    code, _, err = _eval(capsys, siglip_run, "--demo-eval-samples", "16", "--loss-backend", "nosuch")
    assert code == 2 and "--loss-backend 'nosuch': unknown" in err


def test_model_overrides_set_what_no_weight_records(siglip_run, capsys, tmp_path, monkeypatch):
    """An open_clip model trained with exact GELU (or other head counts) had no command-line way
    to be read right: --model-overrides sets quick_gelu, vision_heads, text_heads for an
    OpenAI-layout file; anything else, or a value a fastclip file contradicts, is refused."""
    from fastclip.eval import evaluate
    from fastclip.models import create_model
    torch.manual_seed(0)
    src = create_model("tiny-vit", vision_width=128, vision_heads=2, text_width=128, text_heads=4, quick_gelu=False)
    torch.save(src.state_dict(), tmp_path / "openai.pt")
    loaded, real = [], evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    code, out, err = _eval(capsys, str(tmp_path / "openai.pt"), "--shapes", "--demo-eval-samples", "12",
                           "--model-overrides", '{"quick_gelu": false, "text_heads": 4, "vision_heads": 2}')
    assert code == 0, err
    # The model the command evaluated is the source model: its architecture and its outputs.
    (m,) = loaded
    assert (m.config.quick_gelu, m.config.vision_num_heads, m.config.text_num_heads) == (False, 2, 4)
    img, txt = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        assert torch.allclose(m.encode_image(img), src.eval().encode_image(img), atol=1e-6)
        assert torch.allclose(m.encode_text(txt), src.encode_text(txt), atol=1e-6)
    monkeypatch.setattr(evaluate, "load_model", real)
    from fastclip.eval.evaluate import load_model
    m = load_model(str(tmp_path / "openai.pt"), architecture={"quick_gelu": False, "text_heads": 4})
    assert not m.config.quick_gelu and m.config.text_num_heads == 4
    for args, needle in (
            (["--model-overrides", '{"vision_layers": 2}'], "the file gives the rest, not vision_layers"),
            (["--model-overrides", '{"text_heads": "4"}'], "text_heads must be a positive int"),
            (["--model-overrides", '{"quick_gelu": false}'], "quick_gelu=False (the file's: True) contradicts")):
        code, _, err = _eval(capsys, siglip_run, *args)
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)


def test_class_names_that_are_the_folders_own_in_another_order_are_matched_by_name(tmp_path):
    """--zeroshot-classes yellow,red,green,blue over folders blue/green/red/yellow named each
    folder by another's name (class k is the k-th folder in sorted order): every class scored
    0% with nothing said. The folders' own names, in any order, now name their own folders."""
    from fastclip.datasets.folder import scan_class_folders
    root = tmp_path / "zs"
    for d in ("blue", "golden_retriever", "green", "Red"):      # (sorted: capitals first)
        (root / d).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / d / "a.png")
    assert scan_class_folders(str(root)).folders == ["Red", "blue", "golden_retriever", "green"]
    got = scan_class_folders(str(root), ["green", "golden retriever", "blue", "Red"]).classnames
    assert got == ["Red", "blue", "golden retriever", "green"]
    # other names are positional, as documented: one per folder in sorted order
    assert scan_class_folders(str(root), ["a", "b", "c", "d"]).classnames == ["a", "b", "c", "d"]
    # a list that is not a permutation of the folders' names (a repeat, a stranger) stays positional
    assert scan_class_folders(str(root), ["green", "green x", "blue", "Red"]).classnames == \
        ["green", "green x", "blue", "Red"]
