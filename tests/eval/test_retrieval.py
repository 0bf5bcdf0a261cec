"""Chunked retrieval recall@K against a brute-force stable-sort reference."""
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
    # image 1's similarities hold an inf: that query misses, the other three images hit; every
    # caption's row holds image 1's inf (or a nan): all four misses.
    assert got["image_to_text_R@1"] == 0.75 and got["text_to_image_R@1"] == 0.0, got


def test_caption_map_and_ks_must_be_integers():
    x = torch.eye(3)
    with pytest.raises(TypeError, match="text_to_image .* must be integer class indices"):
        retrieval_metrics(x, x, torch.tensor([0.0, 1.5, 2.0]))
    for ks in ((1.5,), (True,), (), "1"):
        with pytest.raises(ValueError, match="ks must be a non-empty sequence of positive ints"):
            retrieval_metrics(x, x, ks=ks)


def test_similarities_are_fp32_inside_a_callers_bf16_autocast():
    """In bf16 a row of 2000 similarities had 1008 distinct values, and ties moved recall."""
    g = torch.Generator().manual_seed(3)
    img = torch.randn(300, 32, generator=g)
    txt = img + 0.9 * torch.randn(300, 32, generator=g)
    ref = retrieval_metrics(img, txt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = retrieval_metrics(img, txt)
    assert got == ref
