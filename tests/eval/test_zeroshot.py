"""Zero-shot classifier construction, metrics and folder classification."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastclip.eval.evaluate import zeroshot_metrics
from fastclip.eval.templates import COLOR_TEMPLATES, IMAGENET_TEMPLATES, SHAPE_TEMPLATES
from fastclip.eval.zeroshot import (
    build_zeroshot_classifier,
    classification_metrics,
    classify_folder,
    evaluate_zeroshot,
    zero_shot_classify,
)
from fastclip.models import create_model
from fastclip.tokenizer import tokenize


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny-vit").eval()


def test_templates():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES + SHAPE_TEMPLATES + COLOR_TEMPLATES)
    assert "a photo of a {}." in IMAGENET_TEMPLATES and "itap of a {}." in IMAGENET_TEMPLATES


def test_classifier_is_normalised_mean_of_normalised_prompts(model):
    classes, templates = ["circle", "square", "red triangle"], ["a photo of a {}.", "a {} object.", lambda c: f"{c}!"]
    w = build_zeroshot_classifier(model, classes, templates, batch_size=4)
    assert w.shape == (64, 3) and w.dtype == torch.float32
    with torch.no_grad():
        for k, c in enumerate(classes):
            texts = [t(c) if callable(t) else t.format(c) for t in templates]
            e = F.normalize(model.encode_text(tokenize(texts, context_length=32)), dim=-1).mean(0)
            torch.testing.assert_close(w[:, k], F.normalize(e, dim=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="classnames"):
        build_zeroshot_classifier(model, [], templates)


def test_classification_metrics_known_answer():
    logits = torch.tensor([[3., 2, 1, 0, -1, -2], [0, 3, 2, 1, -1, -2], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 2, 0, 0])
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(0.5) and m["top5"] == pytest.approx(0.75)
    # class 0: 2 of 3 right; class 2: 0 of 1 -> mean recall 1/3
    assert m["mean_per_class_recall"] == pytest.approx((2 / 3 + 0) / 2)


class _Stub(torch.nn.Module):
    """encode_image returns the flattened image: features are given directly."""
    context_length = 8

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, x):
        return x.flatten(1)


def test_evaluate_tensor_and_loader_agree():
    g = torch.Generator().manual_seed(0)
    clf = F.normalize(torch.randn(6, 4, generator=g), dim=0)  # [D, C]
    labels = torch.randint(0, 4, (40,), generator=g)
    feats = clf.t()[labels] + 0.3 * torch.randn(40, 6, generator=g)
    imgs = feats.view(40, 1, 2, 3)
    m = evaluate_zeroshot(_Stub(), imgs, labels, clf, batch_size=7)
    loader = [(imgs[i:i + 9], labels[i:i + 9]) for i in range(0, 40, 9)]
    assert evaluate_zeroshot(_Stub(), loader, classifier=clf) == m
    expect = ((F.normalize(feats, dim=-1) @ clf).argmax(1) == labels).float().mean().item()
    assert m["top1"] == pytest.approx(expect) and m["top5"] == 1.0 and m["n"] == 40
    assert zero_shot_classify(_Stub(), imgs, clf).shape == (40, 4)


def test_evaluate_real_model_runs(model):
    clf = build_zeroshot_classifier(model, ["a", "b", "c"], ["{}"])
    m = evaluate_zeroshot(model, torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1]), clf)
    assert set(m) == {"top1", "top5", "mean_per_class_recall", "n"} and m["top5"] == 1.0


def test_classify_folder(model, tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("red_circle", "blue_square"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "red_circle" / "notes.txt").write_text("not an image")
    out = classify_folder(model, str(tmp_path), templates=SHAPE_TEMPLATES)
    assert out["classnames"] == ["blue square", "red circle"] and out["n"] == 4
    assert len(out["predictions"]) == 4 and all(0 < p <= 1 for _, _, p in out["predictions"])
    flat = tmp_path / "blue_square"
    out2 = classify_folder(model, str(flat), classnames=["x", "y"])
    assert "top1" not in out2 and len(out2["predictions"]) == 2
    with pytest.raises(ValueError, match="classnames is required"):
        classify_folder(model, str(flat))
    # A file that does not decode is skipped and listed; a hidden folder is not a class.
    (tmp_path / "red_circle" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    out3 = classify_folder(model, str(tmp_path), templates=SHAPE_TEMPLATES)
    assert out3["classnames"] == ["blue square", "red circle"] and out3["n"] == 4
    assert [os.path.basename(p) for p in out3["skipped"]] == ["broken.jpg"]


def test_long_prompts_are_cut_to_the_context_and_names_must_be_a_list(model):
    long_name = " ".join(["word"] * 3 * model.context_length)
    clf = build_zeroshot_classifier(model, ["cat", long_name], ["a photo of a {}."])
    assert clf.shape == (model.embed_dim, 2) and torch.isfinite(clf).all()
    with pytest.raises(TypeError, match="single string"):
        build_zeroshot_classifier(model, "dog", ["{}"])


def test_classification_metrics_wants_flat_labels():
    with pytest.raises(ValueError, match=r"labels must be 1-D \[N\], got shape \(4, 1\)"):
        classification_metrics(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long))


def test_non_finite_logits_are_misses_and_labels_are_class_indices():
    """All-NaN logits (a diverged model) scored top-1 50% and top-5 100% with 3 classes: topk
    picks arbitrary indices among NaNs. Such a row is a miss; labels outside [0, C) or not
    integers are errors (1.9 was truncated to class 1 and scored as a hit)."""
    logits = torch.tensor([[1.0, 2.0, 0.0], [float("nan")] * 3, [0.0, float("inf"), 1.0]])
    r = classification_metrics(logits, torch.tensor([1, 0, 1]))
    assert r["top1"] == pytest.approx(1 / 3) and r["top5"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\), got values from 0 to 7"):
        classification_metrics(torch.randn(2, 3), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"in \[0, 3\), got values from -1"):
        classification_metrics(torch.randn(2, 3), [-1, 0])
    with pytest.raises(TypeError, match="labels must be integer class indices, got dtype torch.float32"):
        classification_metrics(torch.randn(2, 3), torch.tensor([0.0, 1.9]))
    # an empty list is no labels, and no predictions are no score (it read 0.0: always wrong)
    with pytest.raises(ValueError, match="no predictions to score"):
        classification_metrics(torch.zeros(0, 3), [])


def test_minus_inf_masks_a_class_out_of_the_ranking():
    """-inf is how a subset of a label space is scored (classes outside the task masked): a row
    with any -inf logit was a miss, so [[5, 1, -inf], [0, 3, -inf]] scored top-1 0 with both
    argmaxes right. A -inf on the label itself is a miss; NaN and +inf rows stay misses."""
    inf = float("inf")
    r = classification_metrics(torch.tensor([[5.0, 1, -inf], [0, 3, -inf]]), [0, 1])
    assert r["top1"] == 1.0 and r["top5"] == 1.0 and r["mean_per_class_recall"] == 1.0
    # masked classes rank last: label 1 is second of the two unmasked, so top-5 but not top-1
    r = classification_metrics(torch.tensor([[-inf, 2.0, -inf, 3.0]]), [1])
    assert r["top1"] == 0.0 and r["top5"] == 1.0
    for row, label in (([-inf, -inf, 1.0], 0), ([-inf, -inf, -inf], 1), ([1.0, nan := float("nan"), 0], 0),
                       ([inf, 0.0, 0.0], 0), ([2.0, 1.0, nan], 0)):
        r = classification_metrics(torch.tensor([row]), [label])
        assert r["top1"] == 0.0 and r["top5"] == 0.0, (row, label)


def test_tied_logits_rank_by_class_index():
    """topk's order among equal logits is unspecified: on CPU row [0,1,1,1,0,1] scored label 3
    a top-1 hit and label 1 a miss, and a zero row counted class 2 right, against argmax (and
    classify_folder's listed predictions), which take the first of a tie."""
    row = torch.tensor([[0.0, 1, 1, 1, 0, 1]])
    assert classification_metrics(row, [1])["top1"] == 1.0
    assert classification_metrics(row, [3])["top1"] == 0.0
    zeros = torch.zeros(4, 6)
    r = classification_metrics(zeros, [0, 2, 4, 5])
    assert r["top1"] == 0.25 and r["top5"] == 0.75            # classes 0-4 are the top 5 of a tie
    wide = torch.zeros(1, 40).index_fill_(1, torch.tensor([7, 30, 3, 21, 12, 25]), 2.0)
    assert [classification_metrics(wide, [k])["top5"] for k in (3, 7, 12, 21, 25, 30)] == [1, 1, 1, 1, 1, 0]


def test_no_images_is_an_error_not_zero_accuracy():
    clf = F.normalize(torch.randn(8, 3), dim=0)
    with pytest.raises(ValueError, match="holds no images"):
        evaluate_zeroshot(_Stub(), torch.zeros(0, 3, 8, 8), [], classifier=clf)
    with pytest.raises(ValueError, match="gave no images"):
        evaluate_zeroshot(_Stub(), [], classifier=clf)
    with pytest.raises(ValueError, match="task 'empty' has no images"):
        zeroshot_metrics(_Stub(), {"empty": (torch.zeros(0, 3, 8, 8), [], ["a", "b"], ["{}"])})


def test_templates_must_place_the_class_name(model):
    with pytest.raises(TypeError, match=r"templates must be a sequence .*pass \['a photo of a \{\}.'\]"):
        build_zeroshot_classifier(model, ["cat", "dog"], "a photo of a {}.")
    with pytest.raises(ValueError, match="has no {} for the class name"):
        build_zeroshot_classifier(model, ["cat", "dog"], ["a photo of a {}.", "a photo."])
    with pytest.raises(ValueError, match="is not a format string"):
        build_zeroshot_classifier(model, ["cat", "dog"], ["a photo of a {name}."])
    clf = build_zeroshot_classifier(model, ["cat", "dog"], ["a {0} and a {0}.", lambda c: f"{c}!"])
    assert clf.shape == (model.embed_dim, 2)
    # A conversion places the name too (the check's marker, escaped by !r, was not found).
    for t in ("a photo of a {!r}.", "a photo of a {0!a}.", "a photo of a {:>12}."):
        assert build_zeroshot_classifier(model, ["cat", "dog"], [t]).shape == (model.embed_dim, 2)


def test_similarities_are_fp32_inside_bf16_autocast(model):
    """--precision bf16 runs the encoders under autocast; the similarity stays fp32 (in bf16, 7
    of 48 rows of the demo's shape task tied for the maximum)."""
    clf = build_zeroshot_classifier(model, ["cat", "dog", "car"], ["a photo of a {}."])
    imgs = torch.randn(6, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = zero_shot_classify(model, imgs, clf)
        emb = model.encode_image(imgs)
    assert got.dtype == torch.float32
    want = 100.0 * F.normalize(emb.float(), dim=-1) @ clf
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_classify_runs_in_eval_mode_whatever_the_models_mode():
    """In train mode a BatchNorm encoder normalised with each batch's statistics: the logits
    depended on the batch size (up to 12 apart) and the running statistics were overwritten."""
    torch.manual_seed(0)
    rn = create_model("tiny-rn")                      # a fresh module is in train mode
    clf = build_zeroshot_classifier(rn, ["a", "b", "c"], ["{}"])
    assert rn.training
    stats = {k: v.clone() for k, v in rn.state_dict().items() if "running" in k}
    x = torch.randn(4, 3, rn.config.image_size, rn.config.image_size)
    whole = zero_shot_classify(rn, x, clf, batch_size=4)
    single = zero_shot_classify(rn, x, clf, batch_size=1)
    assert torch.allclose(whole, single, atol=1e-4, rtol=1e-4)
    assert rn.training                                # the caller's mode is restored
    assert all(torch.equal(rn.state_dict()[k], v) for k, v in stats.items())


def test_each_submodules_mode_is_restored():
    """A frozen tower kept in eval mode inside a training model (its BatchNorm statistics held)
    came back in train mode: the model's flag was applied to every submodule."""
    rn = create_model("tiny-rn")
    rn.train()
    rn.visual.eval()
    want = {name: m.training for name, m in rn.named_modules()}
    clf = build_zeroshot_classifier(rn, ["a", "b"], ["{}"])
    assert {name: m.training for name, m in rn.named_modules()} == want
    zero_shot_classify(rn, torch.randn(2, 3, rn.config.image_size, rn.config.image_size), clf)
    assert {name: m.training for name, m in rn.named_modules()} == want


def test_classnames_must_be_ordered(model):
    # A set's order follows string hashing, which changes between processes: column k would
    # not be a fixed class.
    with pytest.raises(TypeError, match="classnames must be an ordered sequence.*set"):
        build_zeroshot_classifier(model, {"dog", "cat"}, ["a {}"])
    with pytest.raises(TypeError, match="frozenset"):
        build_zeroshot_classifier(model, frozenset({"dog", "cat"}), ["a {}"])


def test_classify_folder_checks_classnames_as_the_classifier_does(model, tmp_path):
    """classify_folder split classnames="dog" into the classes 'd', 'o', 'g' (and "cd" named the
    folders cat/ and dog/ 'c' and 'd'), took a set in an order that changes between processes,
    and failed on a non-str name with an AttributeError from .lower()."""
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / cls / "a.png")
    for folder in (tmp_path, tmp_path / "cat"):     # class subfolders, and a flat folder of images
        for names, text in (("dog", "classnames must be a sequence of class names, got a single string 'dog'"),
                            ("cd", "got a single string 'cd'"),
                            (["cat", 5], "classnames must be strings, got int 5 at position 1"),
                            ({"cat", "dog"}, "classnames must be an ordered sequence")):
            with pytest.raises(TypeError, match=text):
                classify_folder(model, str(folder), classnames=names)
    out = classify_folder(model, str(tmp_path), classnames=(n for n in ("a cat", "a dog")))
    assert out["classnames"] == ["a cat", "a dog"]


def test_template_faults_name_the_template(model):
    """A template "{0.foo}" raised a bare AttributeError, a callable giving an int was reported
    as the tokenizer's texts[1], and one ignoring the class name was blamed on tokenisation."""
    with pytest.raises(ValueError, match=r"template 'a \{0.foo\}' is not a format string .*attribute 'foo'"):
        build_zeroshot_classifier(model, ["cat", "dog"], ["a {0.foo}"])
    with pytest.raises(TypeError, match="template .*lambda.* gave a int \\(5\\) for class 'cat', not a str prompt"):
        build_zeroshot_classifier(model, ["cat", "dog"], ["a {}", lambda c: 5])
    with pytest.raises(ValueError, match="the templates give both the same text: each template must use the class"):
        build_zeroshot_classifier(model, ["cat", "dog"], [lambda c: "a photo"])


def test_classification_metrics_takes_numpy_logits():
    m = classification_metrics(np.array([[1.0, 2.0], [3.0, 0.0]]), np.array([1, 1]))
    assert (m["top1"], m["n"]) == (0.5, 2)


def test_classify_folder_reads_nested_images_and_refuses_empty_classes(model, tmp_path):
    """Images in sub-folders of a class folder are the class's; a class folder without images
    would be a class no image can be right for, and is refused."""
    rng = np.random.default_rng(0)
    for rel in ("red/0.png", "red/sub/1.png", "blue/deep/er/2.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / rel)
    out = classify_folder(model, str(tmp_path), templates=SHAPE_TEMPLATES)
    assert out["classnames"] == ["blue", "red"] and out["n"] == 3
    assert [os.path.relpath(p, tmp_path) for p, _, _ in out["predictions"]] == \
        ["blue/deep/er/2.png", "red/0.png", "red/sub/1.png"]
    (tmp_path / "green").mkdir()
    with pytest.raises(ValueError, match="class folder.*with no image file.*green"):
        classify_folder(model, str(tmp_path))


def test_a_folder_of_one_class_is_refused(tmp_path):
    # One class folder: every image is "right" whatever the model (top-1 100%, chance 100%).
    from fastclip.datasets.csv_dataset import DataError
    from fastclip.datasets.folder import scan_class_folders
    (tmp_path / "red").mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "red" / "0.png")
    with pytest.raises(DataError, match="one class folder .*'red'.* at least 2 classes"):
        scan_class_folders(str(tmp_path))


def test_batch_size_must_be_a_positive_int(model, tmp_path):
    """range(0, N, -1) is empty: a negative batch size returned [0, C] logits (no images
    classified) and 0 failed inside range(); each is refused up front, naming batch_size."""
    clf = build_zeroshot_classifier(model, ["a", "b"], ["{}"])
    imgs = torch.randn(5, 3, model.image_size, model.image_size)
    labels = torch.tensor([0, 1, 0, 1, 0])
    for bs in (-1, 0):
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bs}"):
            zero_shot_classify(model, imgs, clf, batch_size=bs)
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bs}"):
            evaluate_zeroshot(model, imgs, labels, clf, batch_size=bs)
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bs}"):
            evaluate_zeroshot(model, [(imgs, labels)], classifier=clf, batch_size=bs)
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bs}"):
            build_zeroshot_classifier(model, ["a", "b"], ["{}"], batch_size=bs)
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bs}"):
            classify_folder(model, str(tmp_path), classnames=["a", "b"], batch_size=bs)
    for bs in (2.5, True, "8"):
        with pytest.raises(TypeError, match="batch_size must be a positive int, got"):
            zero_shot_classify(model, imgs, clf, batch_size=bs)
    assert zero_shot_classify(model, imgs, clf, batch_size=np.int64(2)).shape == (5, 2)


def test_labels_must_be_class_indices_before_any_image_is_encoded():
    """Class names as labels gave torch's "too many dimensions 'str'"."""
    clf = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=0)  # [D, C]
    imgs = torch.randn(5, 1, 2, 3)
    with pytest.raises(TypeError, match=r"labels must be integer class indices.*'cat'.*indices first"):
        evaluate_zeroshot(_Stub(), imgs, ["cat"] * 5, classifier=clf)
    with pytest.raises(TypeError, match=r"the labels of batch 0 of images_or_loader must be integer class indices"):
        evaluate_zeroshot(_Stub(), [(imgs, ["cat"] * 5)], classifier=clf)
    with pytest.raises(ValueError, match="labels has 3 entries for 5 images"):
        evaluate_zeroshot(_Stub(), imgs, [0, 1, 2], classifier=clf)
    assert evaluate_zeroshot(_Stub(), imgs, np.array([0, 1, 2, 3, 0]), classifier=clf)["n"] == 5


def test_classifier_shape_is_checked_against_the_image_features(model):
    """A [C, D] classifier (transposed) failed inside the matmul with shapes that name neither."""
    clf = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=0)  # [D=6, C=4]
    imgs, labels = torch.randn(5, 1, 2, 3), torch.tensor([0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match=r"classifier must be \[embed_dim=6, num_classes\].*got shape \(4, 6\)"
                                         r".*transposed.*classifier\.t\(\)"):
        zero_shot_classify(_Stub(), imgs, clf.t())
    with pytest.raises(ValueError, match=r"classifier must be \[embed_dim=6, num_classes\].*got shape \(5, 4\)$"):
        evaluate_zeroshot(_Stub(), imgs, labels, torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"classifier must be a float tensor \[embed_dim, num_classes\].*\(6,\)"):
        evaluate_zeroshot(_Stub(), imgs, labels, clf[:, 0])
    real = build_zeroshot_classifier(model, ["a", "b", "c"], ["{}"])
    x = torch.randn(2, 3, model.image_size, model.image_size)
    with pytest.raises(ValueError, match=rf"embed_dim={model.embed_dim}.*transposed"):
        evaluate_zeroshot(model, x, [0, 1], classifier=real.t())


def test_classnames_may_be_any_iterable_of_strings(model):
    """A generator has no len(): it failed with "object of type 'generator' has no len()"."""
    ref = build_zeroshot_classifier(model, ["cat", "dog"], ["a photo of a {}.", "a {}"])
    got = build_zeroshot_classifier(model, (c for c in ["cat", "dog"]), (t for t in ["a photo of a {}.", "a {}"]))
    assert torch.equal(got, ref)
    assert torch.equal(build_zeroshot_classifier(model, {"cat": 0, "dog": 1}, ["a photo of a {}.", "a {}"]), ref)
    # A dict's keys are a Set by type, but ordered as the dict: refused as "changing order" before.
    assert torch.equal(build_zeroshot_classifier(model, {"cat": 0, "dog": 1}.keys(), ["a photo of a {}.", "a {}"]),
                       ref)
    with pytest.raises(TypeError, match="classnames must be strings, got int 3 at position 1"):
        build_zeroshot_classifier(model, ["cat", 3], ["{}"])
    with pytest.raises(TypeError, match="classnames must be an iterable of class names"):
        build_zeroshot_classifier(model, 5, ["{}"])
    with pytest.raises(ValueError, match="classnames must not be empty"):
        build_zeroshot_classifier(model, iter([]), ["{}"])


def test_classify_folder_encodes_each_batch_as_it_is_decoded(model, tmp_path, monkeypatch):
    """Every image was decoded and kept before the first was encoded (~30 GB for ImageNet's
    validation set at 224 px), against the docstring's "decoded and encoded at a time"."""
    import fastclip.datasets.csv_dataset as csv_dataset
    for c in ("circle", "square"):
        os.makedirs(tmp_path / c)
        for i in range(7):
            Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "square" / "broken.png").write_bytes(b"not a png")
    decoded, seen = [0], []
    real_load, real_encode = csv_dataset.load_image, model.encode_image

    def load(path, *a, **k):
        decoded[0] += 1
        return real_load(path, *a, **k)

    def encode(x):
        seen.append((decoded[0], x.shape[0]))
        return real_encode(x)
    monkeypatch.setattr(csv_dataset, "load_image", load)
    monkeypatch.setattr(model, "encode_image", encode)
    whole = classify_folder(model, str(tmp_path), templates=SHAPE_TEMPLATES, batch_size=64)
    seen.clear()
    decoded[0] = 0
    out = classify_folder(model, str(tmp_path), templates=SHAPE_TEMPLATES, batch_size=4)
    assert [b for _, b in seen] == [4, 4, 4, 2]
    assert all(d <= 4 * (k + 1) + 1 for k, (d, _) in enumerate(seen)), seen   # one broken file
    assert out["n"] == 14 and len(out["skipped"]) == 1
    assert [p for p, _, _ in out["predictions"]] == [p for p, _, _ in whole["predictions"]]
    for (_, a, pa), (_, b, pb) in zip(out["predictions"], whole["predictions"]):
        assert a == b and pa == pytest.approx(pb, rel=1e-5, abs=1e-6)


def test_folders_that_are_not_classes_or_name_one_class_twice(tmp_path):
    """macOS's __MACOSX/ of "._x.jpg" resource forks became a class "  MACOSX" (chance 1/3 for
    2 classes, top-1 that can never be right for it), "._x.jpg" files inside class folders were
    images; golden_retriever/ and "golden retriever/" gave one class name twice (equal
    prompts: 50% top-1 meaning nothing), and --zeroshot-classes "Dog,dog" passed though the
    tokenizer lower-cases both."""
    from fastclip.datasets.csv_dataset import DataError
    from fastclip.datasets.folder import ImageFolderDataset, read_classnames, scan_class_folders
    from fastclip.transforms import image_transform
    for rel in ("red/0.png", "blue/1.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / rel)
    for rel in ("__MACOSX/red/._0.png", "red/._0.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    scan = scan_class_folders(str(tmp_path))
    assert scan.folders == ["blue", "red"] and [os.path.basename(p) for p, _ in scan.samples] == ["1.png", "0.png"]
    (tmp_path / "Blue").mkdir()
    Image.new("RGB", (8, 8), (0, 0, 200)).save(tmp_path / "Blue" / "2.png")
    with pytest.raises(DataError, match=r"class folders that give one class name .*'Blue' = 'blue'"):
        scan_class_folders(str(tmp_path))
    with pytest.raises(DataError, match=r"class names repeat .*'Dog' = 'dog'"):
        read_classnames("Dog,cat,dog")
    with pytest.raises(DataError, match=r"class names that are one name to the tokenizer .*'A' = 'a'"):
        scan_class_folders(str(tmp_path), ["A", "b", "a"])
    # A linear probe uses no class names: Blue/ and blue/ are two classes to it.
    assert scan_class_folders(str(tmp_path), distinct_names=False).folders == ["Blue", "blue", "red"]
    # A class whose files all fail to decode is refused like one without image files.
    (tmp_path / "Blue" / "2.png").write_bytes(b"not a png")
    (tmp_path / "Blue").rename(tmp_path / "green")
    ds = ImageFolderDataset(str(tmp_path), image_transform(16))
    with pytest.raises(DataError, match=r"no image of class\(es\) 'green' could be decoded"):
        ds.check_decodable()


def test_huge_and_tiny_image_features_classify_as_unit_ones():
    """Features at 1e20 (finite) overflowed float32's sum of squares: every image became the
    zero vector and all logits tied."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    clf = F.normalize(torch.randn(6, 4, generator=g), dim=0)    # [D, C]
    imgs = torch.randn(10, 1, 2, 3, generator=g)
    ref = zero_shot_classify(_Stub(), imgs, clf)
    for scale in (1e20, 1e-30):
        torch.testing.assert_close(zero_shot_classify(_Stub(), imgs * scale, clf), ref)


def test_classes_whose_prompts_tokenise_the_same_are_refused(model, monkeypatch):
    """Equal columns give every image of the later class to the earlier (ties rank by index):
    its recall silently 0. Names equal but for case (the tokenizer lower-cases), a name twice,
    or prompts cut to the context before the name are refused before any text is encoded."""
    calls = []
    monkeypatch.setattr(model, "encode_text", lambda t: calls.append(t) or torch.randn(t.shape[0], model.embed_dim))
    for names in (["Cat", "dog", "cat"], ["dog", "dog"], ["dog", " dog  "]):
        with pytest.raises(ValueError, match=r"classnames 0 '.*' and \d '.*' give the same prompts.*could never"):
            build_zeroshot_classifier(model, names, ["a photo of a {}.", "{}"])
    small = create_model("tiny-vit", context_length=8).eval()
    with pytest.raises(ValueError, match=r"0 'cat' and 1 'dog'.*context_length 8 tokens"):
        build_zeroshot_classifier(small, ["cat", "dog"], ["a low resolution photo of the {}."])
    assert calls == []
    # One template that cuts the name away is enough only when all of a class's prompts agree.
    clf = build_zeroshot_classifier(small, ["cat", "dog"], ["a low resolution photo of the {}.", "{}"])
    assert clf.shape == (small.embed_dim, 2) and not torch.allclose(clf[:, 0], clf[:, 1])


def test_a_loader_carries_its_own_labels_batch_by_batch():
    g = torch.Generator().manual_seed(1)
    clf = F.normalize(torch.randn(6, 3, generator=g), dim=0)      # [D, C]
    imgs, labels = torch.randn(8, 1, 2, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    whole = evaluate_zeroshot(_Stub(), imgs, labels, clf)
    assert evaluate_zeroshot(_Stub(), imgs.numpy(), labels.numpy(), clf) == whole   # arrays as tensors
    with pytest.raises(ValueError, match=r"batch 0 of images_or_loader has 2 labels for 3 images"):
        evaluate_zeroshot(_Stub(), [(imgs[:3], labels[:2]), (imgs[3:4], labels[2:4])], classifier=clf)
    with pytest.raises(ValueError, match=r"batch 1 .* must be a pair \(images, labels\), got 3 items"):
        evaluate_zeroshot(_Stub(), [(imgs[:4], labels[:4]), (imgs[4:], labels[4:], ["p"] * 4)], classifier=clf)
    with pytest.raises(ValueError, match="labels is for a tensor of images"):
        evaluate_zeroshot(_Stub(), [(imgs, labels)], labels + 100, clf)
    with pytest.raises(TypeError, match="images_or_loader must be a tensor .* got int"):
        evaluate_zeroshot(_Stub(), 5, classifier=clf)
    with pytest.raises(TypeError, match=r"images must be a tensor \[N, 3, H, W\].*torch.stack"):
        zero_shot_classify(_Stub(), list(imgs), clf)


def test_classify_folder_image_size_is_the_models(model, tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 40)).save(tmp_path / cls / "0.png")
    with pytest.raises(ValueError, match=f"image_size 64: the model takes {model.image_size} px"):
        classify_folder(model, str(tmp_path), image_size=64)
    assert classify_folder(model, str(tmp_path), image_size=model.image_size)["n"] == 2
