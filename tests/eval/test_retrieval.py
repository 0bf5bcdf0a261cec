"""Chunked retrieval recall@K against a brute-force stable-sort reference."""
import numpy as np
import pytest
import torch

from fastclip.eval.retrieval import retrieval_metrics


def brute(img, txt, t2i, ks):
    s = img @ txt.t()  # [N, M]
    out = {}
    order = torch.argsort(s, dim=1, descending=True, stable=True)  # image -> texts
    i2t = torch.tensor([min((order[i] == j).nonzero().item() for j in (t2i == i).nonzero().flatten().tolist())
                        for i in range(img.shape[0])])
    order_t = torch.argsort(s.t(), dim=1, descending=True, stable=True)
    t2i_r = torch.tensor([(order_t[j] == t2i[j]).nonzero().item() for j in range(txt.shape[0])])
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t < k).float().mean().item()
    for k in ks:
        out[f"text_to_image_R@{k}"] = (t2i_r < k).float().mean().item()
    return out


@pytest.mark.parametrize("chunk", [1, 7, 13, 1000])
def test_one_caption_per_image(chunk):
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(50, 16, generator=g), dim=-1)
    got = retrieval_metrics(img, txt, chunk_size=chunk)
    ref = brute(img, txt, torch.arange(50), (1, 5, 10))
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k
    assert 0 < got["image_to_text_R@1"] < 1


@pytest.mark.parametrize("chunk", [3, 10, 64])
def test_multiple_captions_and_ties(chunk):
    g = torch.Generator().manual_seed(1)
    n, per = 23, 5
    t2i = torch.arange(n).repeat_interleave(per)[torch.randperm(n * per, generator=g)]
    # integer-valued features -> many exact ties in the similarities
    img = torch.randint(-1, 2, (n, 4), generator=g).float()
    txt = torch.randint(-1, 2, (n * per, 4), generator=g).float()
    got = retrieval_metrics(img, txt, t2i, ks=(1, 2, 5, 10), chunk_size=chunk, normalize=False)
    ref = brute(img, txt, t2i, (1, 2, 5, 10))
    for k, v in ref.items():
        assert got[k] == pytest.approx(v), k


def test_perfect_and_errors():
    x = torch.eye(12)
    got = retrieval_metrics(x, x.clone(), chunk_size=5)
    assert all(v == 1.0 for v in got.values())
    with pytest.raises(ValueError, match="text_to_image is required"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="share D"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 0, 1]))


def test_non_finite_features_are_misses():
    # A diverged model's NaN/inf features must not score perfect recall (NaN compares false
    # with everything, which made every rank 0).
    x = torch.eye(4)
    got = retrieval_metrics(torch.full((4, 4), float("nan")), x)
    assert all(v == 0.0 for v in got.values()), got
    bad = x.clone()
    bad[1, 1] = float("inf")
    got = retrieval_metrics(bad, x, ks=(1,), normalize=False)
    # image 1's features hold an inf: that query misses, the other three images hit; image 1 is
    # never retrieved, so caption 1 misses and the other three captions find their images.
    assert got["image_to_text_R@1"] == 0.75 and got["text_to_image_R@1"] == 0.75, got


def test_caption_map_and_ks_must_be_integers():
    x = torch.eye(3)
    with pytest.raises(TypeError, match="text_to_image .* must be integer class indices"):
        retrieval_metrics(x, x, torch.tensor([0.0, 1.5, 2.0]))
    for ks in ((1.5,), (True,), (), "1"):
        with pytest.raises(ValueError, match="ks must be a non-empty sequence of positive ints"):
            retrieval_metrics(x, x, ks=ks)
    with pytest.raises(ValueError, match=r"positive int\), got 0$"):      # as passed, not (0,)
        retrieval_metrics(x, x, ks=0)
    with pytest.raises(TypeError, match="normalize must be a bool, got str 'no'"):   # it normalised
        retrieval_metrics(x, x, normalize="no")
    assert retrieval_metrics(x, x, normalize=np.True_) == retrieval_metrics(x, x, normalize=True)


def test_similarities_are_fp32_inside_a_callers_bf16_autocast():
    """In bf16 a row of 2000 similarities had 1008 distinct values, and ties moved recall."""
    g = torch.Generator().manual_seed(3)
    img = torch.randn(300, 32, generator=g)
    txt = img + 0.9 * torch.randn(300, 32, generator=g)
    ref = retrieval_metrics(img, txt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = retrieval_metrics(img, txt)
    assert got == ref


def test_a_non_finite_candidate_is_never_retrieved():
    """One NaN caption sat in every image query's similarity row, which made every image->text
    recall 0; it is now only never retrieved, and its own image's and its own query miss."""
    nan = float("nan")
    x = torch.eye(4, 8)
    bad = torch.cat([x[:3], torch.full((1, 8), nan)])
    for ks in ((1,), (10,)):
        want = {f"image_to_text_R@{ks[0]}": 0.75, f"text_to_image_R@{ks[0]}": 0.75, "mean_recall": 0.75}
        assert retrieval_metrics(x, bad, ks=ks) == want          # a NaN caption
        assert retrieval_metrics(bad, x, ks=ks) == want          # a NaN image
    # An image with a NaN caption and a finite one is still found by the finite one; the NaN
    # caption, ahead of it by index, does not take its rank.
    img = torch.eye(3, 4)
    txt = torch.cat([torch.full((1, 4), nan), img, torch.tensor([[0.0, 0.0, 0.0, float("inf")]])])
    got = retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 2, 1]), ks=(1,))
    assert got["image_to_text_R@1"] == 1.0 and got["text_to_image_R@1"] == pytest.approx(3 / 5)


def test_array_likes_a_single_k_and_clear_errors():
    x = torch.eye(5)
    ref = retrieval_metrics(x, x + 0.5, torch.arange(5), ks=(3,))
    got = retrieval_metrics(x.numpy(), (x + 0.5).numpy().astype(np.float64), np.arange(5), ks=3)
    assert got == ref
    assert retrieval_metrics(x, x + 0.5, ks=np.int64(3)) == ref
    with pytest.raises(TypeError, match=r"text_to_image .* must be integer class indices.*'a'"):
        retrieval_metrics(x[:4], x[:4], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"text_to_image must have shape \[4\], got \(3,\)"):
        retrieval_metrics(x[:4], x[:4], [0, 1, 2])
    with pytest.raises(TypeError, match="image_features must be a tensor"):
        retrieval_metrics("features", x)
    with pytest.raises(ValueError, match="ks must be a non-empty sequence of positive ints"):
        retrieval_metrics(x, x, ks=1.5)
    with pytest.raises(ValueError, match="ks must be a non-empty sequence of positive ints"):
        retrieval_metrics(x, x, ks=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        retrieval_metrics(x, x, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be a positive int, got float 2.0"):
        retrieval_metrics(x, x, chunk_size=2.0)


def test_results_do_not_depend_on_chunk_size():
    """chunk_size is a memory setting; a float32 product's last bit depended on the chunk's
    height (BLAS blocks it differently), which decided near-ties: two cosines equal in exact
    arithmetic (0 and 0 below) ranked differently with chunk_size 1 and 2."""
    img = torch.tensor([[-2.0, 1, 1], [-3, 3, -3]])
    txt = torch.tensor([[2.0, 3, 2], [2, 3, 1]])
    got = {c: retrieval_metrics(img, txt, ks=1, chunk_size=c) for c in (1, 2)}
    assert got[1] == got[2]
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for _ in range(150):                 # small integer features: many near-ties
        n, d = int(torch.randint(2, 12, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        img = torch.randint(-3, 4, (n, d), generator=g).float()
        txt = torch.randint(-3, 4, (2 * n, d), generator=g).float()
        t2i = torch.arange(2 * n) % n
        results = [retrieval_metrics(img, txt, t2i, ks=(1, 2), chunk_size=c) for c in (1, 3, 1024)]
        assert results[0] == results[1] == results[2], (img, txt)


def test_no_images_or_no_captions_is_an_error_not_a_recall_of_zero():
    """Empty features returned every recall as 0.0, a model that retrieves nothing."""
    for n, m in ((0, 0), (0, 3), (3, 0)):
        with pytest.raises(ValueError, match="retrieval needs at least one image and one caption"):
            retrieval_metrics(torch.zeros(n, 4), torch.zeros(m, 4), text_to_image=torch.zeros(m, dtype=torch.long))


def test_extreme_feature_scales_keep_their_ranking():
    """F.normalize sums squares in float32: features at 1e18 (finite) overflowed to inf norms,
    every row became zero and R@1 fell from 1.0 to chance; at 1e-30 the squares vanished. Rows
    are scaled by their largest entry before normalising."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    img = torch.randn(40, 64, generator=g)
    txt = img + 0.05 * torch.randn(40, 64, generator=g)
    ref = retrieval_metrics(img, txt, ks=(1, 5))
    assert ref["image_to_text_R@1"] == 1.0
    for scale in (1e18, 1e30, 1e-30, 1e-36):
        assert retrieval_metrics(img * scale, txt * scale, ks=(1, 5)) == ref, scale


def test_zero_width_features_and_huge_k():
    with pytest.raises(ValueError, match="D = 0: there is nothing to compare"):
        retrieval_metrics(torch.zeros(3, 0), torch.zeros(3, 0))
    x = torch.eye(4)
    r = retrieval_metrics(x, x, ks=(1, 10**30))          # an OverflowError before
    assert r["image_to_text_R@1"] == 1.0 and r[f"text_to_image_R@{10**30}"] == 1.0
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert retrieval_metrics(nan, x, ks=10**30)[f"image_to_text_R@{10**30}"] == 0.75   # a miss stays one
