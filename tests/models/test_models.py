"""Model construction, shapes, parameter counts, checkpointing, torch.compile."""
import json

import pytest
import torch

from fastclip.models import OPENAI_PARAM_COUNTS, CLIPConfig, create_model, get_config, list_models

OPENAI_NINE = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
# OpenAI's published totals (numel over all parameters of the released checkpoints, logit_scale included)
PUBLISHED = {"RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601, "RN50x16": 290_979_217,
             "RN50x64": 623_258_305, "ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737,
             "ViT-L/14": 427_616_513, "ViT-L/14@336px": 427_944_193}


def _vit_count(image, patch, width, layers, embed):
    block = 4 * width * width + 4 * width + 8 * width * width + 5 * width + 4 * width  # attn + mlp + 2 LN
    return (width * 3 * patch * patch + width + ((image // patch) ** 2 + 1) * width + 4 * width
            + layers * block + width * embed)


def _text_count(ctx, vocab, width, layers, embed):
    block = 12 * width * width + 13 * width
    return vocab * width + ctx * width + layers * block + 2 * width + width * embed + 1  # + logit_scale


def test_list_models_has_the_nine_and_small_ones():
    names = list_models()
    assert names[:9] == OPENAI_NINE
    assert {"tiny-vit", "tiny-rn", "demo"} <= set(names)
    assert OPENAI_PARAM_COUNTS == PUBLISHED


@pytest.mark.parametrize("name", OPENAI_NINE)
def test_param_counts_match_openai(name):
    with torch.device("meta"):
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == PUBLISHED[name]
    c = model.config
    if not c.is_resnet:  # independent closed-form count of the published ViT architecture
        assert n == _vit_count(c.image_size, c.patch_size, c.vision_width, c.vision_layers, c.embed_dim) + \
            _text_count(77, 49408, c.text_width, c.text_layers, c.embed_dim)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_forward_shapes_and_normalisation(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    c = model.config
    img = torch.randn(3, 3, c.image_size, c.image_size)
    tok = torch.randint(1, 1000, (3, c.context_length))
    tok[:, 5] = 49407
    with torch.no_grad():
        fi, ft, scale = model(img, tok)
        ri, rt, _ = model(img, tok, normalize=False)
    assert fi.shape == ft.shape == (3, c.embed_dim) and fi.dtype == ft.dtype == torch.float32
    torch.testing.assert_close(fi.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(torch.nn.functional.normalize(ri, dim=-1), fi)
    torch.testing.assert_close(model.encode_text(tok), rt)
    assert scale.shape == () and abs(scale.item() - 1 / 0.07) < 1e-3
    assert model.forward(img, None)[1] is None


def test_text_pooling_at_eot_and_causal():
    torch.manual_seed(0)
    model = create_model("tiny-vit").eval()
    tok = torch.zeros(2, 32, dtype=torch.long)
    tok[:, 0], tok[:, 1:4], tok[:, 4] = 49406, torch.tensor([5, 6, 7]), 49407
    tok2 = tok.clone()
    tok2[:, 10:] = 123  # tokens after EOT cannot influence the EOT feature (causal mask)
    tok2[:, 4] = 49407
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tok), model.encode_text(tok2))


def test_bf16_forward_runs():
    model = create_model("tiny-vit").to(torch.bfloat16).eval()
    with torch.no_grad():
        fi, ft, _ = model(torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 32)))
    assert fi.dtype == torch.bfloat16 and torch.isfinite(fi.float()).all()


def test_config_json_round_trip_and_overrides():
    for name in list_models():
        c = get_config(name)
        assert CLIPConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    m = create_model("tiny-vit", context_length=16)
    assert m.positional_embedding.shape == (16, 64) and m.context_length == 16
    with pytest.raises(ValueError, match="context_lenght"):
        create_model("tiny-vit", context_lenght=16)
    with pytest.raises(ValueError, match="unknown model name"):
        create_model("ViT-Z/99")


def test_init_logit_scale():
    m = create_model("tiny-rn")
    assert abs(m.logit_scale.item() - torch.log(torch.tensor(1 / 0.07)).item()) < 1e-6
    assert all((blk.bn3.weight == 0).all() for blk in m.visual.layer1)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_grad_checkpointing_same_grads(name):
    torch.manual_seed(0)
    model = create_model(name).eval()  # eval: BatchNorm statistics are not updated twice
    img = torch.randn(2, 3, model.image_size, model.image_size)
    tok = torch.randint(1, 49407, (2, model.context_length))

    def grads():
        model.zero_grad()
        fi, ft, s = model(img, tok)
        (s * fi @ ft.t()).logsumexp(1).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    model.set_grad_checkpointing(True)
    assert model.transformer.grad_checkpointing
    got = grads()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_torch_compile_tiny():
    torch.manual_seed(0)
    model = create_model("tiny-vit").eval()
    img, tok = torch.randn(2, 3, 32, 32), torch.randint(1, 49408, (2, 32))
    with torch.no_grad():
        ref = model(img, tok)
        try:
            out = torch.compile(model, fullgraph=True, backend="aot_eager")(img, tok)
        except Exception as e:  # noqa: BLE001 - pragma: no cover, only without a compiler stack
            pytest.skip(f"torch.compile unavailable: {e}")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_logit_bias_is_optional():
    """CLIP models (and OpenAI's checkpoints) have no bias and return three outputs; a model
    built with ``init_logit_bias`` (SigLIP) has a learnable one and returns it fourth."""
    import math

    from fastclip.models import create_model
    plain = create_model("tiny-vit")
    assert plain.logit_bias is None and "logit_bias" not in plain.state_dict()
    assert len(plain(torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 32)))) == 3
    sig = create_model("tiny-vit", init_logit_scale=10.0, init_logit_bias=-10.0)
    out = sig(torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 32)))
    assert len(out) == 4 and out[3].requires_grad and out[3].item() == -10.0
    assert abs(sig.logit_scale.item() - math.log(10.0)) < 1e-6
    sig.init_weights()
    assert sig.logit_bias.item() == -10.0
    with pytest.raises(ValueError, match="init_logit_bias"):
        create_model("tiny-vit", init_logit_bias=float("nan"))
    with pytest.raises(ValueError, match="init_logit_scale"):
        create_model("tiny-vit", init_logit_scale=0.0)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_init_weights_redraws_every_tensor_after_to_empty(name):
    """A model built on the meta device, materialised with to_empty and filled with NaN, is a
    working model after init_weights(): every parameter and buffer is drawn again."""
    with torch.device("meta"):
        m = create_model(name)
    m.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*m.parameters(), *m.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))
    m.init_weights()
    bad = [n for n, t in [*m.named_parameters(), *m.named_buffers()]
           if t.is_floating_point() and not torch.isfinite(t).all()]
    assert bad == []
    m.eval()
    img = torch.randn(2, 3, m.image_size, m.image_size)
    i, t, scale = m(img, torch.randint(1, 1000, (2, m.context_length)))
    assert torch.isfinite(i).all() and torch.isfinite(t).all() and scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_encoders_refuse_inputs_of_another_shape():
    m = create_model("tiny-vit").eval()
    for bad in (torch.randn(2, 3, 35, 35), torch.randn(2, 3, 64, 64), torch.randn(3, 32, 32),
                torch.randn(2, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"images: expected \[B, 3, 32, 32\]"):
            m.encode_image(bad)
    r = create_model("tiny-rn").eval()
    with pytest.raises(ValueError, match=r"images: expected \[B, 3, 64, 64\]"):
        r.encode_image(torch.randn(2, 3, 70, 70))            # a ResNet would otherwise run on it
    with pytest.raises(ValueError, match="40 tokens per row, more than the model's context_length 32"):
        m.encode_text(torch.randint(1, 100, (2, 40)))
    with pytest.raises(ValueError, match="integer token ids"):
        m.encode_text(torch.randint(1, 100, (5,)))
    with pytest.raises(ValueError, match="integer token ids"):
        m.encode_text(torch.randn(2, 5))
    assert m.encode_text(torch.randint(1, 100, (2, 5))).shape == (2, 64)   # shorter rows are fine
    # uint8 pixels were cast and encoded unscaled: features of images the model never saw
    for model in (m, r):
        s = model.image_size
        for dt in (torch.uint8, torch.int64, torch.bool, torch.complex64):
            with pytest.raises(ValueError, match=f"images: expected floating-point pixels.*got {dt}"):
                model.encode_image(torch.zeros(1, 3, s, s, dtype=dt))


def test_resnet_attention_pool_heads_must_divide_its_width():
    with pytest.raises(ValueError, match="heads must divide its width 224"):
        create_model("tiny-rn", vision_width=7, vision_heads=None)      # default rule: 3 heads
    with pytest.raises(ValueError, match="heads must divide its width 256"):
        create_model("tiny-rn", vision_heads=3)


def test_empty_images_are_refused_by_the_transform_and_skipped_by_the_loader(tmp_path):
    from PIL import Image

    from fastclip.datasets.csv_dataset import load_image
    from fastclip.transforms import image_transform
    with pytest.raises(ValueError, match="0x5"):
        image_transform(32)(Image.new("RGB", (0, 5)))
    assert load_image(str(tmp_path / "missing.png")) is None


@pytest.mark.parametrize("overrides, needle", [
    ({"context_length": 1}, "context_length must be >= 2"),          # passed, then tokenize failed mid-run
    ({"patch_size": True}, "patch_size must be an int, got True"),    # JSON true was the int 1
    ({"vision_layers": True}, "vision_layers must be an int"),
    ({"vision_width": 64.0}, "vision_width must be an int, got 64.0"),
    ({"text_layers": 100000}, "text_layers must be at most 1024"),    # took hours on the meta device
    # "heads=3 must divide width=64" named neither tower
    ({"vision_heads": 3}, "vision_heads=3 must divide vision_width=64"),
    ({"text_heads": 3}, "text_heads=3 must divide text_width=64"),
    ({"text_width": 200, "text_heads": None}, r"text_heads=null \(3: text_width // 64\) must divide text_width=200"),
    # null failed a comparison: "'<=' not supported between instances of 'NoneType' and 'int'"
    ({"embed_dim": None}, r"embed_dim must be set, got None \(null\)"),
    ({"context_length": None}, "context_length must be set"),
    ({"vision_layers": None}, "vision_layers must be set"),
])
def test_config_fields_are_whole_numbers_in_range(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        create_model("tiny-vit", **overrides)


def test_resnet_edges_width_and_an_empty_batch():
    with pytest.raises(ValueError, match="vision_width must be >= 2 for a ResNet"):
        create_model("tiny-rn", vision_width=1)
    m = create_model("tiny-rn").eval()
    with torch.no_grad():       # the attention pool's view(B, -1, ...) could not infer -1 for B = 0
        assert m.encode_image(torch.zeros(0, 3, m.image_size, m.image_size)).shape == (0, m.embed_dim)


def test_text_ids_of_any_integer_dtype_and_clear_errors_otherwise():
    m = create_model("tiny-vit").eval()
    with torch.no_grad():
        assert m.encode_text(torch.full((2, 5), 7, dtype=torch.uint8)).shape == (2, m.embed_dim)
        for bad in (torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.long)):
            with pytest.raises(ValueError, match=r"text: expected integer token ids \[B, L >= 1\]"):
                m.encode_text(bad)
        # Ids outside the vocabulary: a clear error, not the embedding's bare IndexError.
        small = create_model("tiny-vit", vocab_size=100).eval()
        with pytest.raises(ValueError, match=r"text: token ids from 0 to 49407, outside the model's "
                                             r"vocabulary \[0, 100\)"):
            small.encode_text(torch.tensor([[49406, 5, 49407, 0]]))
        with pytest.raises(ValueError, match=r"token ids from -1 to 7"):
            m.encode_text(torch.tensor([[-1, 7]]))


def test_a_resnet_in_train_mode_names_a_batch_of_one():
    """At image_size 32 the last stage is 1x1, and BatchNorm's own error named no input."""
    m = create_model("demo")
    s = m.image_size
    assert m.training and s // 32 == 1
    with pytest.raises(ValueError, match=r"images: a batch of 1 in train mode.*model.eval\(\)"):
        m.encode_image(torch.randn(1, 3, s, s))
    assert m.encode_image(torch.randn(2, 3, s, s)).shape == (2, m.embed_dim)
    assert m.eval().encode_image(torch.randn(1, 3, s, s)).shape == (1, m.embed_dim)
    big = create_model("demo", image_size=64)       # a 2x2 last stage: one image is enough
    assert big.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, big.embed_dim)
    # Frozen BatchNorm (eval mode inside a training model, as when fine-tuning) takes one image.
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    assert m.encode_image(torch.randn(1, 3, s, s)).shape == (1, m.embed_dim)


def test_an_int_vision_layers_on_a_resnet_says_what_a_resnet_takes():
    """The help's example '{"vision_layers": 2}' on the default ResNet said only "patch_size is
    required for a ViT config"."""
    with pytest.raises(ValueError, match=r"vision_layers 2 \(one int\) makes a ViT image tower, which needs "
                                         r"patch_size; a ResNet tower's vision_layers is 4 ints"):
        create_model("demo", vision_layers=2)
