"""Datasets: the synthetic shapes, CSV and webdataset readers (a corrupt or missing image is skipped
and counted, never fatal), class folders, shard-list expansion."""
import csv
import io
import itertools
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.datasets import (
    COLOR_NAMES,
    HELD_OUT,
    SHAPES,
    CsvDataset,
    ImageFolderDataset,
    ShapesDataset,
    WebDataset,
    collate_skipping,
    expand_urls,
    read_classnames,
)
from fastclip.datasets.csv_dataset import seeded_transform
from fastclip.datasets.shapes import (
    ALL_TRAIN_PAIRS,
    BLOCK,
    MIN_CONTRAST,
    PALETTE,
    SIZES,
    TRAIN_ONLY_COLORS,
    TRAIN_ONLY_SHAPES,
    TRAIN_PAIRS,
)
from fastclip.datasets.webdataset import expand_braces, iter_tar_samples
from fastclip.transforms import image_transform


def _png_bytes(seed, size=40):
    arr = np.random.default_rng(seed).integers(0, 255, (size, size + 3, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


CORRUPT = b"\x89PNG\r\n\x1a\n this is not a png"


def _caption_pair(caption):
    """The (colour, shape) a distinct-design caption names (colours may be two words)."""
    words = caption.split()
    colours = [c for c in PALETTE if f" {c} " in f" {caption} "]
    return (max(colours, key=len) if colours else None), words[-1]


def test_shapes_deterministic_and_holds_out_pairs():
    a, b = ShapesDataset(200, seed=3), ShapesDataset(200, seed=3)
    for i in (0, 7, 199):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert not torch.equal(a[0][0], ShapesDataset(200, seed=4)[0][0])
    img, tok = a[5]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and tok.shape == (32,)
    grays = set()
    for i in range(200):
        s = a.sample(i)
        assert (s["color"], s["shape"]) not in HELD_OUT
        assert s["shape"] in SHAPES + TRAIN_ONLY_SHAPES and s["color"] in PALETTE
        assert _caption_pair(s["caption"]) == (s["color"], s["shape"]), s["caption"]
        assert (s["size"] in s["caption"].split()) or not any(z in s["caption"].split() for z in ("small", "large"))
        # the background is a gray that contrasts with the base colour; the shape lies inside the image
        assert max(abs(v - s["background"]) for v in PALETTE[s["color"]]) >= MIN_CONTRAST
        cx, cy = s["center"]
        assert s["radius"] <= cx <= 32 - s["radius"] and s["radius"] <= cy <= 32 - s["radius"]
        grays.add(s["background"])
    assert len(grays) > 100  # any shade of gray, not a few fixed ones
    # the custom-normalisation path gives the same pixels as the fast default one
    from fastclip.transforms import OPENAI_MEAN, OPENAI_STD
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    c = ShapesDataset(200, seed=3, normalize=lambda x: (x - mean) / std)
    torch.testing.assert_close(c[5][0], a[5][0], rtol=0, atol=1e-5)
    held = ShapesDataset(64, seed=3, split="heldout", image_size=48)
    imgs, shapes, colors = held.eval_tensors()
    assert imgs.shape == (64, 3, 48, 48)
    assert all((COLOR_NAMES[c], SHAPES[s]) in HELD_OUT for s, c in zip(shapes.tolist(), colors.tolist()))
    assert held.labels(5) == (shapes[5].item(), colors[5].item())
    for bad, match in (({"split": "test"}, "split"), ({"design": "random"}, "design"),
                       ({"image_size": 8}, "image_size"),
                       ({"group_size": 0}, "group_size"), ({"group_prob": 1.5}, "group_prob")):
        with pytest.raises(ValueError, match=match):
            ShapesDataset(10, **bad)
    with pytest.raises(ValueError, match="heldout"):
        a.labels(0)


def test_shapes_distinct_batches_have_no_false_negatives():
    """Each block of BLOCK consecutive indices holds every training pair once, so no caption of a
    block describes another image of it; blocks differ in order, the sizes vary."""
    ds = ShapesDataset(3 * BLOCK, seed=11)
    orders = []
    for blk in range(3):
        samples = [ds.sample(blk * BLOCK + k) for k in range(BLOCK)]
        pairs = [(s["color"], s["shape"]) for s in samples]
        assert sorted(pairs) == sorted(ALL_TRAIN_PAIRS) and len(set(pairs)) == BLOCK == 88
        for s in samples:  # a caption matches exactly its own image of the block
            named = _caption_pair(s["caption"])
            assert sum(named == p for p in pairs) == 1
        assert {s["size"] for s in samples} == set(SIZES)
        orders.append(pairs)
    assert orders[0] != orders[1]
    # every task shape is in every training-only colour and every colour on the training-only shapes
    assert {(c, s) for c in TRAIN_ONLY_COLORS for s in SHAPES} <= set(ALL_TRAIN_PAIRS)
    assert {(c, s) for c in COLOR_NAMES for s in TRAIN_ONLY_SHAPES} <= set(ALL_TRAIN_PAIRS)


def test_shapes_other_designs():
    iid = ShapesDataset(BLOCK, seed=5, design="iid")
    pairs = [(iid.sample(i)["color"], iid.sample(i)["shape"]) for i in range(BLOCK)]
    assert len(set(pairs)) < BLOCK and all(p not in HELD_OUT for p in pairs)  # repeats, by chance
    ds = ShapesDataset(640, seed=5, design="colour-groups", group_size=16, group_prob=1.0)
    for g in range(0, 640, 16):
        first = {ds.sample(i)["color"] for i in range(g, g + 16)}
        assert len(first) == 1 and ds.group_color(g) in first
        assert all((ds.sample(i)["color"], ds.sample(i)["shape"]) in TRAIN_PAIRS for i in range(g, g + 16))
    assert len({ds.group_color(g) for g in range(0, 640, 16)}) >= 6
    mixed = ShapesDataset(16 * 200, seed=5, design="colour-groups", group_prob=0.5)
    frac = sum(mixed.group_color(16 * g) is not None for g in range(200)) / 200
    assert 0.35 < frac < 0.65
    assert ShapesDataset(32, seed=5, split="heldout", design="colour-groups").group_color(0) is None


def test_second_renderer_draws_the_named_shapes():
    """The independent evaluation renderer (tests/train/alt_shapes.py): its labels, backgrounds and
    shape areas are what it says (area of a unit-extent shape, against the analytic value)."""
    from . import alt_shapes as alt
    imgs, shapes, colors = alt.heldout_set(48, image_size=32, seed=3)
    assert imgs.shape == (48, 3, 32, 32) and imgs.dtype == torch.float32
    assert {(COLOR_NAMES[c], SHAPES[s]) for s, c in zip(shapes.tolist(), colors.tolist())} == set(HELD_OUT)
    assert alt.SHAPE_NAMES == SHAPES and alt.COLOR_NAMES == COLOR_NAMES and set(alt.HELD_OUT_PAIRS) == set(HELD_OUT)
    rng = np.random.default_rng(0)
    n = 401
    u, v = np.meshgrid(np.linspace(-1.2, 1.2, n), np.linspace(-1.2, 1.2, n))
    cell = (2.4 / (n - 1)) ** 2
    area = {s: alt._mask(s, u, v, 1.0, rng).sum() * cell for s in ("circle", "square")}
    assert abs(area["circle"] - np.pi) < 0.02 and abs(area["square"] - 2.0) < 0.02
    # other proportions than the training renderer's: crosses thinner than any training cross
    # (arm half-width / arm length < PROPORTIONS["cross"][0]), stars mostly fatter
    from fastclip.datasets.shapes import PROPORTIONS
    for _ in range(5):
        cross = alt._mask("cross", u, v, 1.0, rng)
        row = cross[n // 2 + n // 6]  # v = 0.4: only the vertical arm
        half_width = row.sum() * (2.4 / (n - 1)) / 2
        assert 0.12 * 0.95 < half_width < PROPORTIONS["cross"][0] * 0.95
        star_area = alt._mask("star", u, v, 1.0, rng).sum() * cell
        assert 1.4 < star_area < 1.95  # inner radius 0.50-0.65 of the outer (training: 0.35-0.60)
    img = alt.render("star", "red", 32, rng)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    # the background is gray and far from the fill
    corners = [img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]]
    assert any(int(c.max()) == int(c.min()) for c in corners)


def _write_csv_set(root, n_good=5):
    rows = ["filepath,title"]
    for i in range(n_good):
        (root / f"img{i}.png").write_bytes(_png_bytes(i))
        rows.append(f"img{i}.png,a photo number {i}")
    (root / "bad.png").write_bytes(CORRUPT)
    rows.append("bad.png,a corrupt file")
    rows.append("missing.png,a missing file")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return str(root / "train.csv")


def test_csv_skips_and_counts_corrupt_and_missing(tmp_path):
    path = _write_csv_set(tmp_path)
    ds = CsvDataset(path, image_transform(32, train=True), context_length=16)
    assert len(ds) == 7
    samples = [ds[(i, 100 + i)] for i in range(len(ds))]
    imgs, toks, skipped = collate_skipping(samples)
    assert skipped == 2 and imgs.shape == (5, 3, 32, 32) and toks.shape == (5, 16)
    # the seeded augmentation is reproducible
    assert torch.equal(ds[(0, 5)][0], ds[(0, 5)][0])
    with pytest.raises(ValueError, match="caption_key"):
        CsvDataset(path, image_transform(32), caption_key="caption")


def test_csv_bytes_that_are_not_utf8_are_replaced_and_reported(tmp_path):
    """A Latin-1 caption or file name in a UTF-8 CSV is not fatal: the caption byte becomes U+FFFD,
    the file name keeps its bytes (the image still opens) and the rows are named."""
    (tmp_path / "a.png").write_bytes(_png_bytes(1))
    latin1_name = os.fsdecode(b"caf\xe9.png")  # a file name that is not UTF-8
    (tmp_path / latin1_name).write_bytes(_png_bytes(2))
    content = (b"\xef\xbb\xbffilepath,title\n"  # with a byte-order mark, as spreadsheets write it
               b"a.png,a plain caption\n"
               b"a.png,caf\xe9 au lait\n"
               b"caf\xe9.png,a photo\n")
    path = tmp_path / "latin1.csv"
    path.write_bytes(content)
    ds = CsvDataset(str(path), image_transform(32), context_length=16)
    assert len(ds) == 3
    assert ds.captions[1] == "caf\ufffd au lait"
    assert ds.invalid_utf8_lines == [3, 4]
    msg = ds.describe_invalid_utf8()
    assert "latin1.csv" in msg and "2 rows" in msg and "lines 3, 4" in msg
    assert all(ds[i] is not None for i in range(3))  # every image loads, the Latin-1 named one included
    (tmp_path / "clean").mkdir()
    assert CsvDataset(_write_csv_set(tmp_path / "clean"), image_transform(32)).describe_invalid_utf8() is None


def test_csv_without_columns_or_rows_raises_data_error(tmp_path):
    from fastclip.datasets import DataError
    for name, text, needle in (("empty.csv", "", "the file is empty"),
                               ("header.csv", "filepath,title\n", "no rows"),
                               ("cols.csv", "path,caption\na.png,x\n", "column 'filepath'")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"{name}.*{needle}"):
            CsvDataset(str(tmp_path / name), image_transform(32))
    # A shard or a wide header given as CSV printed kilobytes of binary header as "columns".
    shard = _write_shards(tmp_path)[0]
    with pytest.raises(DataError) as e:
        CsvDataset(shard, image_transform(32))
    assert "it looks like a tar archive, not a CSV" in str(e.value) and len(str(e.value)) < 400, str(e.value)
    (tmp_path / "wide.csv").write_text(",".join(f"column_{i}" for i in range(500)) + "\n")
    with pytest.raises(DataError, match=r"\.\.\. \(500 columns\)") as e:
        CsvDataset(str(tmp_path / "wide.csv"), image_transform(32))
    assert len(str(e.value)) < 500


def test_rows_and_samples_without_a_caption_are_skipped_and_named(tmp_path):
    """An empty or blank caption cell, or a row cut short before the caption column, was trained on
    as the empty text (start and end tokens only): now it is a skipped sample, its lines named;
    a file in which no row has a caption is a DataError. So is a blank key.txt in a shard."""
    from fastclip.datasets import DataError
    for i in range(5):
        (tmp_path / f"img{i}.png").write_bytes(_png_bytes(i))
    path = tmp_path / "holes.csv"
    path.write_text("filepath,title\nimg0.png,a cat\nimg1.png,\nimg2.png,  \nimg3.png\nimg4.png,a dog\n")
    ds = CsvDataset(str(path), image_transform(32), context_length=16)
    assert len(ds) == 5 and ds.no_caption_lines == [3, 4, 5]
    assert [ds[i] is None for i in range(5)] == [False, True, True, True, False]
    assert ds.notes() == [f"{path}: 3 rows without a caption (lines 3, 4, 5): skipped, as missing images are"]
    (tmp_path / "clean").mkdir()
    assert CsvDataset(_write_csv_set(tmp_path / "clean"), image_transform(32)).notes() == []
    (tmp_path / "none.csv").write_text("filepath,title\nimg0.png,\nimg1.png, \n")
    with pytest.raises(DataError, match="none.csv: no row has a caption in column 'title'"):
        CsvDataset(str(tmp_path / "none.csv"), image_transform(32))

    shard = tmp_path / "blank.tar"
    with tarfile.open(shard, "w") as tar:
        for key, caption in (("a", b"a red star"), ("b", b" \n"), ("c", b"a blue cross")):
            for name, data in ((f"{key}.png", _png_bytes(ord(key))), (f"{key}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    batches = list(WebDataset(str(shard), 3, image_transform(32), 16, shuffle_buffer=0, max_epochs=1))
    assert sum(len(b[0]) for b in batches) == 2 and sum(b[2] for b in batches) == 1


def test_csv_rows_longer_than_the_header_and_doubled_columns(tmp_path):
    """An unquoted comma in a caption cut it there without a word (the rest went under
    csv.DictReader's None key); a header naming the caption column twice trained on the last."""
    from fastclip.datasets import DataError
    for i in range(3):
        (tmp_path / f"img{i}.png").write_bytes(_png_bytes(i))
    path = tmp_path / "commas.csv"
    path.write_text('filepath,title\nimg0.png,a cat\nimg1.png,a photo, taken at night, of a dog\n'
                    'img2.png,"a photo, quoted"\n')
    ds = CsvDataset(str(path), image_transform(32), context_length=16)
    assert ds.long_row_lines == [3] and ds.no_caption_lines == []
    assert [ds[i] is None for i in range(3)] == [False, True, False] and ds.captions[2] == "a photo, quoted"
    assert ds.notes() == [f"{path}: 1 row with more fields than the header (line 3): skipped (an unquoted "
                          f"separator in a caption? quote such captions)"]
    (tmp_path / "all.csv").write_text("filepath,title\nimg0.png,a, b\nimg1.png,c, d\n")
    with pytest.raises(DataError, match=r"all.csv: every row has more fields than the header's 2 \(separator ','"):
        CsvDataset(str(tmp_path / "all.csv"), image_transform(32))
    (tmp_path / "twice.csv").write_text("filepath,title,title\nimg0.png,a cat,a note\n")
    with pytest.raises(DataError, match=r"twice.csv: column 'title' \(caption_key\) is named 2 times in the "
                                        r"header \(columns 2, 3\)"):
        CsvDataset(str(tmp_path / "twice.csv"), image_transform(32))
    # A separator at the end of every line is fine (the same empty extra field on each row); an
    # empty extra field on some rows only is a cut caption: the row's tail slid into an empty
    # optional last column ("a black cat" was trained on).
    (tmp_path / "trailing.csv").write_text("filepath,title\nimg0.png,a cat,\nimg1.png,a dog, \n")
    ds = CsvDataset(str(tmp_path / "trailing.csv"), image_transform(32))
    assert ds.captions == ["a cat", "a dog"] and ds.long_row_lines == []
    (tmp_path / "slid.csv").write_text("filepath,title,url\nimg0.png,a dog on grass,\n"
                                       "img1.png,a black cat, sitting on a red sofa,\n")
    ds = CsvDataset(str(tmp_path / "slid.csv"), image_transform(32))
    assert ds.captions == ["a dog on grass", ""] and ds.long_row_lines == [3]
    (tmp_path / "other.csv").write_text("filepath,title,note,note\nimg0.png,a cat,x,y\n")
    assert CsvDataset(str(tmp_path / "other.csv"), image_transform(32)).captions == ["a cat"]  # unused: fine
    # Most rows end in a separator and one does not (the last, or a hand-edited line): the
    # trailing-separator rule was all-or-nothing, and 3 of these 4 good rows were skipped.
    (tmp_path / "most.csv").write_text("filepath,title\nimg0.png,a cat,\nimg1.png,a dog,\nimg2.png,a cow,\n"
                                       "img0.png,a hen\n")
    ds = CsvDataset(str(tmp_path / "most.csv"), image_transform(32))
    assert ds.captions == ["a cat", "a dog", "a cow", "a hen"] and ds.long_row_lines == []


def test_a_broken_quote_skips_its_row_and_keeps_the_rest(tmp_path):
    """A quote opened in a caption and never closed: Python's lenient reader folded every later
    line into that caption (16 rows read as 3, without a word); in a larger file the folded field
    passed csv.field_size_limit and the whole file was refused."""
    from fastclip.datasets import DataError
    for i in range(3):
        (tmp_path / f"img{i}.png").write_bytes(_png_bytes(i))
    rows = [f"img{i % 3}.png,caption {i}" for i in range(8)]
    rows[2] = 'img2.png,"caption 2'                       # never closed
    path = tmp_path / "open.csv"
    path.write_text("filepath,title\n" + "\n".join(rows) + "\n")
    ds = CsvDataset(str(path), image_transform(32), context_length=16)
    assert ds.captions == [f"caption {i}" for i in range(8) if i != 2] and ds.broken_lines == [4]
    assert ds.notes() == [f"{path}: 1 row that could not be read as CSV (line 4): skipped, and the lines after "
                          f"each read as rows again (a quote opened in a caption and not closed there? quote the "
                          f"whole caption, doubling the quotes inside it)"]
    # Closed by another row's stray quote: the rows between were folded in as well.
    rows[5] = 'img2.png,caption 5"'
    path.write_text("filepath,title\n" + "\n".join(rows) + "\n")
    ds = CsvDataset(str(path), image_transform(32), context_length=16)
    assert ds.captions == [f"caption {i}" for i in range(8) if i != 2][:4] + ['caption 5"', "caption 6", "caption 7"]
    assert ds.broken_lines == [4]
    # A quoted caption over several lines is a caption, and a quote inside a field is text.
    path.write_text('filepath,title\nimg0.png,"a cat\non a mat, ""asleep"""\nimg1.png,a 12" record\n'
                    'img2.png,"a dog"\n')
    ds = CsvDataset(str(path), image_transform(32), context_length=16)
    assert ds.captions == ['a cat\non a mat, "asleep"', 'a 12" record', "a dog"] and ds.broken_lines == []
    # A caption past the csv module's default field limit (128 KiB) refused the whole file: it
    # is a caption (cut to the context like any other), quoted over several lines too.
    long = "x" * 70_000
    path.write_text(f'filepath,title\nimg0.png,a cat\nimg1.png,{long * 2}\nimg2.png,"{long}\n{long}"\n'
                    f'img0.png,a dog\n')
    ds = CsvDataset(str(path), image_transform(32), context_length=16)
    assert ds.captions == ["a cat", long * 2, f"{long}\n{long}", "a dog"] and ds.broken_lines == []
    assert csv.field_size_limit() == 131072       # the module's limit is left as it was
    # The caption column first, its caption over two lines: the last line, read alone, looks
    # like a row (a field, then an image that exists) and is the end of the caption.
    path.write_text('title,filepath\n"first line\nsecond line",img0.png\na dog,img1.png\n')
    ds = CsvDataset(str(path), image_transform(32), context_length=16)
    assert ds.captions == ["first line\nsecond line", "a dog"] and ds.broken_lines == []
    # The image column first: a stray quote over two lines swallowed the next row (its last
    # line), which must be read as a row.
    path.write_text('filepath,title\nimg0.png,"a cat\nimg1.png,a dog"\nimg2.png,a bird\n')
    ds = CsvDataset(str(path), image_transform(32), context_length=16)
    assert ds.captions == ['a dog"', "a bird"] and ds.broken_lines == [2]
    path.write_text('title,"filepath\nimg0.png,a cat\n')
    with pytest.raises(DataError, match=r"open.csv: the header \(line 1\) is not valid CSV"):
        CsvDataset(str(path), image_transform(32))
    path.write_text('filepath,title\nimg0.png,"a cat\n')
    with pytest.raises(DataError, match=r"open.csv: 1 row that could not be read as CSV \(line 2\): no row left"):
        CsvDataset(str(path), image_transform(32))


def test_an_unreadable_csv_is_a_data_error(tmp_path, monkeypatch):
    """A CSV without read permission ended the run in a PermissionError traceback."""
    from fastclip.datasets import DataError, csv_dataset
    path = tmp_path / "locked.csv"
    path.write_text("filepath,title\nimg0.png,a cat\n")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(csv_dataset, "open", refuse, raising=False)
    with pytest.raises(DataError, match=r"locked.csv: cannot be read \(Permission denied\)"):
        CsvDataset(str(path), image_transform(32))


def _write_shards(root):
    """3 shards, 4 samples each; shard 1 holds one corrupt image and one sample without caption."""
    paths = []
    for s in range(3):
        p = root / f"shard-{s:03d}.tar"
        with tarfile.open(p, "w") as tar:
            for k in range(4):
                key = f"s{s}_{k:02d}"
                img = CORRUPT if (s, k) == (1, 1) else _png_bytes(10 * s + k)
                members = [(f"{key}.png", img)]
                if (s, k) != (1, 2):
                    members.append((f"{key}.txt", f"caption {s} {k}".encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(p))
    return paths


def test_a_pass_that_deals_a_reader_only_empty_shards_is_not_fatal(tmp_path):
    """Shards are dealt to readers anew each pass: a reader dealt only an empty shard raised
    "the shards are empty" mid-training (2 ranks, or 2 DataLoader workers) while the other
    shards held samples. Only data with no sample anywhere is refused."""
    from fastclip.datasets import DataError
    paths = _write_shards(tmp_path)
    empty = tmp_path / "shard-003.tar"
    with tarfile.open(empty, "w"):
        pass
    urls = [paths[0], paths[2], str(empty)]
    for seed in range(6):                    # in some of these passes a reader gets the empty shard alone
        for rank in (0, 1):
            ds = WebDataset(urls, 2, image_transform(16), 8, seed=seed, rank=rank, world_size=2, shuffle_buffer=0)
            batches = list(itertools.islice(iter(ds), 12))     # several passes
            assert len(batches) == 12 and all(len(b[0]) for b in batches)
    with tarfile.open(tmp_path / "e2.tar", "w"):
        pass
    with pytest.raises(DataError, match="the shards are empty"):
        next(iter(WebDataset([str(empty), str(tmp_path / "e2.tar")], 2, image_transform(16), 8, rank=1,
                             world_size=2)))


def test_webdataset_streams_skips_and_counts(tmp_path):
    paths = _write_shards(tmp_path)
    spec = str(tmp_path / "shard-{000..002}.tar")
    assert expand_urls(spec) == paths
    assert expand_urls(str(tmp_path / "shard-*.tar")) == paths
    assert expand_urls(paths[0] + "::" + paths[2]) == [paths[0], paths[2]]
    ds = WebDataset(spec, batch_size=5, transform=image_transform(32), context_length=16, shuffle_buffer=4,
                    max_epochs=1)
    batches = list(ds)
    n_good = sum(len(b[0]) for b in batches)
    n_skipped = sum(b[2] for b in batches)
    assert (n_good, n_skipped) == (10, 2)
    assert batches[0][0].shape[1:] == (3, 32, 32) and batches[0][1].shape[1:] == (16,)
    # two ranks read disjoint parts that cover the whole set
    seen = []
    for r in range(2):
        for _imgs, toks, _ in WebDataset(spec, 2, image_transform(32), 16, rank=r, world_size=2, shuffle_buffer=0,
                                        max_epochs=1):
            seen.extend(toks[:, 2].tolist())
    assert len(seen) == 10
    # an unreadable shard counts as one skipped sample
    (tmp_path / "shard-003.tar").write_bytes(b"not a tar at all")
    ds = WebDataset(str(tmp_path / "shard-{000..003}.tar"), 4, image_transform(32), 16, shuffle_buffer=0,
                    max_epochs=1)
    batches = list(ds)
    assert sum(b[2] for b in batches) == 3 and sum(len(b[0]) for b in batches) == 10


def test_shards_named_but_missing_are_reported(tmp_path):
    # A brace range past the shards that exist trained on those that do, without a word.
    from types import SimpleNamespace

    from fastclip.datasets.webdataset import missing_shards
    from fastclip.train.data import build_train_data
    _write_shards(tmp_path)
    spec = str(tmp_path / "shard-{000..004}.tar") + "::" + str(tmp_path / "gone.tar")
    assert missing_shards(spec) == [str(tmp_path / n) for n in ("shard-003.tar", "shard-004.tar", "gone.tar")]
    assert missing_shards(str(tmp_path / "shard-*.tar")) == []          # a glob names what it matches
    cfg = SimpleNamespace(steps=5, train_num_samples=None, batch_size=2, train_data=spec)
    data = build_train_data(cfg, "webdataset", None, SimpleNamespace(world_size=1))
    assert data.desc.endswith("(3 shards)")
    assert data.notes == [f"3 of the 6 shard paths named do not exist (e.g. {tmp_path / 'shard-003.tar'}): "
                          f"training on the others"]


def test_shards_with_fewer_samples_than_a_global_batch_are_refused(tmp_path):
    # --train-num-samples 3 at a global batch of 4 (2 ranks x 2) trained on repeated samples
    # (an epoch of max(1, 3 // 4) steps) where CSV data of 3 rows is refused.
    from types import SimpleNamespace

    from fastclip.datasets.csv_dataset import DataError
    from fastclip.train.data import build_train_data
    _write_shards(tmp_path)
    spec = str(tmp_path / "shard-{000..002}.tar")
    cfg = SimpleNamespace(steps=5, train_num_samples=3, batch_size=2, train_data=spec)
    with pytest.raises(DataError, match=r"--train-num-samples 3 is less than one global batch \(4\)"):
        build_train_data(cfg, "webdataset", None, SimpleNamespace(world_size=2))
    cfg.train_num_samples = 4
    assert build_train_data(cfg, "webdataset", None, SimpleNamespace(world_size=2)).steps_per_epoch == 1


def test_any_accepted_seed_draws_batches(tmp_path):
    # --seed takes [0, 2**63): the seeds derived from it (seed * 1_000_003 + epoch, ...) are
    # reduced into torch's range; a seed of 2e7 once overflowed the augmentation's generator.
    from fastclip.train.data import StepBatches
    _write_shards(tmp_path)
    spec = str(tmp_path / "shard-{000..002}.tar")
    for seed in (20_260_101, 2 ** 63 - 1):
        sb = StepBatches(40, 4, 0, 1, seed, 0, 10, augment=True)
        keys = sb.keys(0) + sb.keys(25)                       # epochs 0 and 2
        assert len(keys) == 8 and all(0 <= i < 40 for i, _ in keys)
        tf = image_transform(32, train=True)
        imgs, _, _ = next(iter(WebDataset(spec, 2, tf, 16, seed=seed, shuffle_buffer=3)))
        assert imgs.shape[1:] == (3, 32, 32)       # (a shard holds corrupt samples)
    assert torch.equal(seeded_transform(image_transform(8, train=True), 5).generator.get_state(),
                       torch.Generator().manual_seed(5).get_state())   # small seeds: unchanged


def test_webdataset_resume_skips_batches(tmp_path):
    _write_shards(tmp_path)
    spec = str(tmp_path / "shard-{000..002}.tar")
    full = WebDataset(spec, 2, image_transform(32), 16, seed=1, shuffle_buffer=3)
    it = iter(full)
    first = [next(it) for _ in range(5)]
    resumed = next(iter(WebDataset(spec, 2, image_transform(32), 16, seed=1, shuffle_buffer=3, skip_batches=2)))
    # batches 0-1 contain no corrupt sample in this order only if counts match; compare tokens where sizes agree
    assert torch.equal(resumed[1], first[2][1]) or first[0][2] + first[1][2] > 0


def test_brace_expansion():
    assert expand_braces("a{00..02}b") == ["a00b", "a01b", "a02b"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    # As bash: high to low counts down (it matched nothing), padded to the wider end.
    assert expand_braces("s-{002..000}.tar") == ["s-002.tar", "s-001.tar", "s-000.tar"]
    assert expand_braces("{8..010}") == ["008", "009", "010"]
    assert expand_braces("s-{0..10}.tar") == [f"s-{i}.tar" for i in range(11)]      # "0" pads nothing
    assert expand_braces("{2..0}") == ["2", "1", "0"]


def test_a_shard_on_a_pipe_is_read(tmp_path):
    """A pipe's size reads as 0: it was taken for an empty shard and never opened."""
    import threading

    from fastclip.datasets.webdataset import tar_problem
    shard = _tar(tmp_path / "s.tar", [("a.png", _png_bytes(0)), ("a.txt", b"a cat")])
    fifo = tmp_path / "pipe.tar"
    os.mkfifo(fifo)
    assert tar_problem(str(fifo)) is None          # not read ahead: what is read from a pipe is gone
    feed = threading.Thread(target=lambda: fifo.write_bytes(open(shard, "rb").read()), daemon=True)
    feed.start()
    got = list(iter_tar_samples(str(fifo)))
    feed.join(timeout=10)
    assert [s["txt"] for s in got] == [b"a cat"]


def test_image_folder_skips_corrupt(tmp_path):
    for cls in ("red_thing", "blue_thing"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            (tmp_path / cls / f"{i}.png").write_bytes(_png_bytes(i + len(cls)))
    (tmp_path / "blue_thing" / "bad.jpg").write_bytes(b"garbage")
    ds = ImageFolderDataset(str(tmp_path), image_transform(32))
    assert ds.classnames == ["blue thing", "red thing"]
    imgs, labels, skipped = ds.load_tensors()
    assert imgs.shape == (4, 3, 32, 32) and skipped == 1 and labels.tolist() == [0, 0, 1, 1]
    assert read_classnames("cat, dog") == ["cat", "dog"]
    f = tmp_path / "classes.txt"
    f.write_text("cat\n\ndog\n")
    assert read_classnames(str(f)) == ["cat", "dog"]
    with pytest.raises(ValueError, match="class names repeat in 'a,a,b' .*: 'a' = 'a'"):
        read_classnames("a,a,b")        # two classes with the same prompts: neither can be told apart
    with pytest.raises(ValueError, match="class names given"):
        ImageFolderDataset(str(tmp_path), image_transform(32), classnames=["a"])


def test_training_on_csv_and_shards_counts_skipped(tmp_path):
    import json

    from fastclip.train import TrainConfig, train
    csv = _write_csv_set(tmp_path)
    folder = tmp_path / "zs"
    for cls in ("noise_a", "noise_b"):
        (folder / cls).mkdir(parents=True)
        for i in range(2):
            (folder / cls / f"{i}.png").write_bytes(_png_bytes(50 + i + len(cls)))
    (folder / "noise_a" / "broken.png").write_bytes(CORRUPT)
    out = tmp_path / "csv_run"
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(3)
    torch.use_deterministic_algorithms(False)
    try:
        r = train(TrainConfig(model="tiny-vit", train_data=csv, val_data=csv, zeroshot_data=str(folder),
                              zeroshot_templates="simple", output=str(out), batch_size=7, steps=2, warmup=1,
                              progress="none", plot=False, threads=1))
        # train() gives the process back its thread count and deterministic mode (a CPU run sets both)
        assert torch.get_num_threads() == 3 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=True)
    assert r["train_samples_skipped"] == 4  # 2 bad rows x 2 steps (one epoch = one batch of 7)
    assert r["eval_samples_skipped"] == 3  # 2 bad val rows + 1 broken zero-shot image
    assert "zero_shot_zs_top1" in r and "val/loss" in r and "val/image_to_text_R@1" in r
    assert json.load(open(out / "metrics.json"))["train_samples_skipped"] == 4

    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shards(shards)
    r = train(TrainConfig(model="tiny-vit", train_data=str(shards / "shard-{000..002}.tar"),
                          output=str(tmp_path / "wds"),
                          batch_size=4, steps=3, warmup=1, progress="none", plot=False, threads=1))
    assert r["steps"] == 3 and r["train_samples_skipped"] == 2  # 12 samples read, 2 bad


def test_shards_with_samples_split_apart_say_what_to_check(tmp_path):
    """A sample's files must be consecutive tar members (webdataset's convention: the stream
    is read once). A shard with all images first and all captions after pairs none; the
    error said to check CSV paths and --csv-img-key."""
    from fastclip.datasets import DataError
    from fastclip.train import TrainConfig, train
    torch.set_num_threads(1)
    with tarfile.open(tmp_path / "split.tar", "w") as tar:
        members = [(f"k{k}.png", _png_bytes(k)) for k in range(6)] + [(f"k{k}.txt", b"a cat") for k in range(6)]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = TrainConfig(model="tiny-vit", train_data=str(tmp_path / "split.tar"), output=str(tmp_path / "run"),
                      batch_size=2, steps=2, warmup=1, progress="none", plot=False, max_failed_batches=2)
    with pytest.raises(DataError, match=r"split\.tar.*consecutive members of the tar") as e:
        train(cfg)
    assert "--csv-img-key" not in str(e.value)


def test_empty_shards_and_unloadable_validation_data_are_data_errors(tmp_path):
    from fastclip.datasets import DataError
    from fastclip.train import TrainConfig
    from fastclip.train.data import detect_val_type, load_val_batches
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(DataError, match="got no samples .*empty.tar"):
        next(iter(WebDataset(str(empty), 2, image_transform(32), 16, max_epochs=1)))
    # A shard of 0 bytes is an empty shard too: it was read as a fault, one "skipped sample" per
    # pass, and alone it ended in "no sample loaded in 100 batches" (400 samples that do not exist).
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    with pytest.raises(DataError, match="got no samples .*zero.tar"):
        next(iter(WebDataset(str(zero), 2, image_transform(32), 16, max_epochs=1)))
    assert list(iter_tar_samples(str(zero))) == []
    missing = tmp_path / "missing.csv"
    missing.write_text("filepath,title\nnope.png,a cat\ngone.png,a dog\n")
    cfg = TrainConfig(val_data=str(missing), batch_size=2)

    class M:
        image_size, context_length = 32, 16
    with pytest.raises(DataError, match=r"--val-data .*missing.csv.*no sample loaded \(2 skipped.*e\.g\. "
                                        r"line 2: image '.*nope.png' does not exist"):
        load_val_batches(cfg, M())
    # an empty shard as --val-data: the training reader's "reader 0 of 1 ... ranks x --workers"
    # named neither the flag nor the cause
    for shard in (zero, empty):
        with pytest.raises(DataError, match=rf"--val-data '{shard}': no samples \(its shards are empty\)$"):
            load_val_batches(TrainConfig(val_data=str(shard), batch_size=2), M())
    # --val-data's type comes from its own name when it tells, whatever --dataset-type says
    assert detect_val_type(str(missing), "webdataset") == "csv"
    assert detect_val_type(str(empty), "csv") == "webdataset"
    assert detect_val_type("/data/val", "csv") == "csv"
    # --val-num-samples is exact for shards too
    paths = _write_shards(tmp_path)
    batches, _ = load_val_batches(TrainConfig(val_data=paths[0], batch_size=4, val_num_samples=3), M())
    assert sum(len(b[0]) for b in batches) == 3


def test_tsv_files_are_tab_separated_by_default(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(1))
    (tmp_path / "t.tsv").write_text("filepath\ttitle\na.png\ta cat, sitting\n")
    ds = CsvDataset(str(tmp_path / "t.tsv"), image_transform(32))
    assert len(ds) == 1 and ds.captions[0] == "a cat, sitting"


def test_wide_grayscale_images_are_scaled_not_clipped():
    """A 16-bit PNG (0..65535) came back 99.6% white through Pillow's convert("RGB")."""
    from fastclip.datasets.csv_dataset import load_image
    ramp = (np.arange(1024, dtype=np.uint32) * 64).reshape(16, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    got = np.asarray(load_image(buf.getvalue()))
    assert got.shape == (16, 64, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got[..., 0].astype(float), ramp / 257.0, atol=0.5)
    for arr, want in ((np.array([[0, 200]], np.int32), [0, 200]),            # already 8-bit values
                      (np.array([[-5.0, 3.5]], np.float32), [0, 255])):       # any other range: stretched
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="TIFF")
        assert np.asarray(load_image(buf.getvalue()))[0, :, 0].tolist() == want


def _good_shards(tmp_path, shards=2, per=8):
    for s in range(shards):
        with tarfile.open(tmp_path / f"good-{s}.tar", "w") as tar:
            for k in range(per):
                for name, data in ((f"g{s}_{k:02d}.png", _png_bytes(100 * s + k)),
                                   (f"g{s}_{k:02d}.txt", f"photo {s} {k}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(tmp_path / ("good-{0..%d}.tar" % (shards - 1)))


@pytest.mark.parametrize("workers", (0, 2))
def test_webdataset_resume_gives_the_same_augmented_batches(tmp_path, workers):
    """Resumed at data position 3, the shards gave the same samples with other augmentations
    (the per-sample seed counter restarted at 0), and with 2 workers the batches came back
    pairwise swapped (DataLoader starts at worker 0, the run had reached worker 1)."""
    spec = _good_shards(tmp_path)
    tf = image_transform(24, train=True)

    def batches(skip, k):
        ds = WebDataset(spec, 2, tf, 16, seed=3, shuffle_buffer=4, skip_batches=skip)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
        return [next(it) for _ in range(k)]

    full = batches(0, 7)
    resumed = batches(3, 4)
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_unusable_data_under_torchrun_names_the_short_rank_not_this_one():
    """Under torchrun a rank that had loaded 3, 2 and 2 samples of the skipped batches said it
    had loaded 'fewer than 2 samples' (another rank was the short one)."""
    from types import SimpleNamespace

    from fastclip.datasets import DataError
    from fastclip.train.data import BatchDraws

    def trainer(distributed):
        return SimpleNamespace(cfg=SimpleNamespace(max_failed_batches=None, batch_size=4), steps_per_epoch=8,
                               env=SimpleNamespace(distributed=distributed, world_size=2 if distributed else 1),
                               min_batch=2, min_batch_why="the model's BatchNorm needs 2", data_desc="CSV t.csv")
    with pytest.raises(DataError, match=r"fewer than 2 samples loaded on at least one rank \(every rank skips such "
                                        r"a batch together; the model's BatchNorm needs 2\) in 8 batches in a row"):
        BatchDraws(trainer(True), iter(()), 0).unusable(8, most=3)
    with pytest.raises(DataError, match=r"CSV t.csv: fewer than 2 samples loaded \(the model's BatchNorm needs 2\)"):
        BatchDraws(trainer(False), iter(()), 0).unusable(8, most=1)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_captions_the_tokenizer_empties_are_no_captions(tmp_path):
    """'&nbsp;' (a common scraped alt text), a lone byte-order mark or control characters pass a
    blank check but tokenize to nothing: they were trained on as the empty text."""
    for i in range(2):
        (tmp_path / f"img{i}.png").write_bytes(_png_bytes(i))
    path = tmp_path / "t.csv"
    path.write_text("filepath,title\nimg0.png,&nbsp;\nimg1.png,\ufeff\nimg0.png,\x01\nimg1.png,a cat\n",
                    encoding="utf-8")
    ds = CsvDataset(str(path), image_transform(32), context_length=8)
    assert [ds[i] is None for i in range(4)] == [True, True, True, False]
    shard = _tar(tmp_path / "t.tar", [("a.png", _png_bytes(0)), ("a.txt", b"&nbsp;"),
                                      ("b.png", _png_bytes(1)), ("b.txt", b"a dog")])
    batches = list(WebDataset(shard, 2, image_transform(32), 8, shuffle_buffer=0, max_epochs=1))
    assert [len(b[0]) for b in batches] == [1] and [b[2] for b in batches] == [1]


def test_a_key_used_twice_in_a_shard_starts_a_new_sample(tmp_path):
    """n.jpg, n.txt, n.jpg, n.txt: the second pair overwrote the first in one sample (one pair
    lost, uncounted); m.jpg, m.txt, m.jpg trained the second image with the first's caption."""
    from fastclip.datasets.webdataset import iter_tar_samples
    a, b = _png_bytes(0), _png_bytes(1)
    shard = _tar(tmp_path / "dup.tar", [("n.png", a), ("n.txt", b"A"), ("n.png", b), ("n.txt", b"B"),
                                        ("m.png", a), ("m.txt", b"C"), ("m.png", b)])
    got = [{k: (v if k == "txt" else v == a) for k, v in s.items()} for s in iter_tar_samples(shard)]
    assert got == [{"png": True, "txt": b"A"}, {"png": False, "txt": b"B"}, {"png": True, "txt": b"C"},
                   {"png": False}]


def test_a_shard_cut_inside_or_before_a_header_counts_as_truncated(tmp_path):
    """tarfile ends a stream quietly at a header after the first that is cut short, absent (cut
    at a member boundary, before the end-of-archive blocks) or garbage: the shard's remaining
    samples vanished and no skip was counted. A cut inside a member's data was counted."""
    members = [(f"{i}.{ext}", data) for i in range(4) for ext, data in (("png", _png_bytes(i)), ("txt", b"a cat"))]
    whole = open(_tar(tmp_path / "whole.tar", members), "rb").read()
    offsets = []                                   # where each member's header starts
    with tarfile.open(tmp_path / "whole.tar") as tar:
        offsets = [m.offset for m in tar.getmembers()]
    third = offsets[4]                             # the header of 2.png
    cases = {"in_header": whole[:third + 100], "at_boundary": whole[:third],
             "garbage_header": whole[:third] + b"\x07" * 512 + whole[third + 512:],
             "in_data": whole[:third + 512 + 30]}
    for name, data in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
        got = list(iter_tar_samples(str(tmp_path / f"{name}.tar")))
        assert got[-1] is None and len(got) == 3, (name, got)       # 2 samples, then the fault
    assert [sorted(s) for s in iter_tar_samples(str(tmp_path / "whole.tar"))] == [["png", "txt"]] * 4
    import gzip
    (tmp_path / "whole.tar.gz").write_bytes(gzip.compress(whole))
    assert len(list(iter_tar_samples(str(tmp_path / "whole.tar.gz")))) == 4
    batches = list(WebDataset(str(tmp_path / "in_header.tar"), 8, image_transform(32), 8, shuffle_buffer=0,
                              max_epochs=1))
    assert [len(b[0]) for b in batches] == [2] and [b[2] for b in batches] == [1]


def test_a_member_beyond_the_size_cap_is_not_read(tmp_path, monkeypatch):
    # A 1.4 MB gzip shard held a 1.5 GB member: every pass inflated it into memory (3 GB of
    # RAM, a MemoryError under a cap). Beyond MAX_MEMBER_BYTES it is left empty: its sample is
    # skipped and counted, the others train.
    import gzip

    import fastclip.datasets.webdataset as wds
    monkeypatch.setattr(wds, "MAX_MEMBER_BYTES", 1 << 16)
    path = tmp_path / "bomb.tar.gz"
    with gzip.open(path, "wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for key, img in (("a", _png_bytes(1)), ("big", bytes(1 << 20)), ("c", _png_bytes(3))):
            for name, data in ((f"{key}.png", img), (f"{key}.txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert path.stat().st_size < 20_000
    got = list(iter_tar_samples(str(path)))
    assert [s["txt"] for s in got] == [b"caption a", b"caption big", b"caption c"]
    assert got[1]["png"] == b"" and len(got[0]["png"]) > 0
    ds = WebDataset(str(path), 3, image_transform(16), 16, shuffle_buffer=0)
    imgs, _, skipped = next(iter(ds))
    assert len(imgs) + skipped >= 3 and skipped >= 1


def test_hidden_shard_members_are_no_samples(tmp_path):
    """macOS tar adds "./._0001.png" beside "./0001.png": as a sample of key "" each hidden
    member cut the sample around it in two, so no image met its caption (2 good samples came
    out as 8 skipped ones)."""
    shard = _tar(tmp_path / "mac.tar", [
        ("./._0001.png", b"\x00\x05\x16\x07"), ("./0001.png", _png_bytes(1)),
        ("./._0001.txt", b"\x00\x05\x16\x07"), ("./0001.txt", b"a red circle"),
        ("./.DS_Store", b"\x00"), ("./0002.png", _png_bytes(2)), ("__MACOSX/./0002.txt", b"xattr"),
        ("./0002.txt", b"a blue square")])
    got = list(iter_tar_samples(shard))
    assert [sorted(s) for s in got] == [["png", "txt"], ["png", "txt"]]
    assert [s["txt"] for s in got] == [b"a red circle", b"a blue square"]


def test_a_tsv_file_is_read_with_tabs_only_when_its_header_has_one(tmp_path):
    """`--csv-separator ,` on a comma-separated pairs.tsv was replaced by a tab (the default is
    ','), and the error then named the separator nobody asked for."""
    from fastclip.datasets import CsvDataset
    from fastclip.datasets.csv_dataset import DataError
    for i in range(2):
        (tmp_path / f"img{i}.png").write_bytes(_png_bytes(i))
    (tmp_path / "comma.tsv").write_text("filepath,title\nimg0.png,a cat\nimg1.png,a dog\n")
    (tmp_path / "tab.tsv").write_text("filepath\ttitle\nimg0.png\ta cat, sitting\nimg1.png\ta dog\n")
    for name in ("comma.tsv", "tab.tsv"):
        ds = CsvDataset(str(tmp_path / name), image_transform(16), separator=",")
        assert len(ds) == 2 and ds[0] is not None
    (tmp_path / "blank.tsv").write_text("\n\r\nfilepath\ttitle\nimg0.png\ta cat, sitting\nimg1.png\ta dog\n")
    assert len(CsvDataset(str(tmp_path / "blank.tsv"), image_transform(16))) == 2   # blank lines before the header
    from fastclip.datasets.csv_dataset import csv_header, csv_image_paths
    assert csv_header(str(tmp_path / "blank.tsv")) == ["filepath", "title"]
    assert [os.path.basename(p) for p in csv_image_paths(str(tmp_path / "blank.tsv"), "filepath")] == \
        ["img0.png", "img1.png"]
    (tmp_path / "bad.tsv").write_text("path,caption\nimg0.png,a cat\n")
    with pytest.raises(DataError, match=r"column 'filepath' \(img_key\) not found.*\(separator ','\)"):
        CsvDataset(str(tmp_path / "bad.tsv"), image_transform(16))


def test_csv_column_faults_name_the_flags(tmp_path):
    """"column 'filepath' (img_key) not found" named the Python argument, and neither
    --csv-img-key nor which of --train-data and --val-data was at fault."""
    from fastclip.datasets.csv_dataset import DataError
    from fastclip.train import TrainConfig, train
    for i in range(4):
        (tmp_path / f"img{i}.png").write_bytes(_png_bytes(i))
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("filepath,title\n" + "".join(f"img{i}.png,shape {i}\n" for i in range(4)))
    bad.write_text("path,caption\nimg0.png,a cat\n")
    base = dict(model="tiny-vit", steps=1, batch_size=2, threads=1, progress="none", plot=False)
    with pytest.raises(DataError, match=r"^--train-data .*bad.csv: column 'filepath' \(--csv-img-key\) not found"):
        train(TrainConfig(train_data=str(bad), output=str(tmp_path / "a"), **base))
    bad.write_text("filepath,caption\nimg0.png,a cat\n")
    with pytest.raises(DataError, match=r"^--val-data .*bad.csv: column 'title' \(--csv-caption-key\) not found"):
        train(TrainConfig(train_data=str(good), val_data=str(bad), output=str(tmp_path / "b"), **base))


def test_an_epoch_says_how_many_rows_it_leaves_out(tmp_path, capsys):
    """Epochs train full batches (a new shuffle each): 61 rows in batches of 8 left 5 out of every
    epoch without a word."""
    from fastclip.train import TrainConfig, train
    for i in range(5):
        (tmp_path / f"img{i}.png").write_bytes(_png_bytes(i))
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("filepath,title\n" + "".join(f"img{i % 5}.png,shape {i}\n" for i in range(11)))
    base = dict(model="tiny-vit", batch_size=4, threads=1, progress="none", plot=False, train_data=str(csv_path))
    out = train(TrainConfig(steps=None, epochs=2, output=str(tmp_path / "a"), **base))
    assert out["steps"] == 4
    assert "each epoch trains 2 full batches of 4: 3 of the 11 rows (other ones each epoch" in capsys.readouterr().out
    train(TrainConfig(steps=2, output=str(tmp_path / "b"), **base))        # a step count: no epochs to speak of
    assert "full batches" not in capsys.readouterr().out


def test_a_demo_batch_that_does_not_divide_its_blocks_is_noted():
    """The demo's batches are consecutive indices, blocks of 88 distinct (colour, shape) pairs:
    --batch-size 100 (or 2 ranks x 50) mixed two blocks, a pair twice in a batch, without a word."""
    from types import SimpleNamespace

    from fastclip.train import TrainConfig
    from fastclip.train.data import build_train_data
    model = SimpleNamespace(image_size=32, context_length=16)
    for batch, world, design, noted in ((100, 1, "distinct", True), (50, 2, "distinct", True),
                                        (88, 1, "distinct", False), (22, 2, "distinct", False),
                                        (100, 1, "iid", False)):
        cfg = TrainConfig(batch_size=batch, demo_design=design, demo_train_samples=400)
        notes = build_train_data(cfg, "shapes", model, SimpleNamespace(world_size=world)).notes
        assert any(f"a global batch of {batch * world} does not divide the demo's blocks of 88" in n
                   for n in notes) == noted, (batch, world, design, notes)
