"""Kept-patch pictures: dropped patches darkened, kept ones in colour with a border, on the model's grid."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dllava.eval.overlay import (
    CLIP_MEAN,
    CLIP_STD,
    KEPT_COLOR,
    kept_patch_overlay,
    kept_patch_panel,
    patch_grid,
    pixels_to_image,
)


def _red_image(size=96):
    return Image.new("RGB", (size, size), (200, 30, 30))


def test_patch_grid_is_the_square_root_and_skips_a_cls_token():
    assert patch_grid(64) == (8, False)
    assert patch_grid(576) == (24, False)
    assert patch_grid(65) == (8, True)
    with pytest.raises(ValueError, match="square"):
        patch_grid(60)


def test_kept_patches_keep_their_colour_and_dropped_ones_are_darkened_grey():
    keep = torch.zeros(64, dtype=torch.bool)
    keep[0] = True  # top-left patch
    out = np.asarray(kept_patch_overlay(_red_image(), keep, size=96))
    assert out.shape == (96, 96, 3)
    inside_kept = out[5, 5]  # inside patch (0, 0), away from its border
    assert tuple(inside_kept) == (200, 30, 30)
    dropped = out[50, 50]
    assert dropped[0] == dropped[1] == dropped[2] < 100  # grey and dark
    assert tuple(out[0, 0]) == KEPT_COLOR  # the kept patch's border


def test_keep_mask_is_row_major_over_the_grid():
    keep = torch.zeros(64, dtype=torch.bool)
    keep[1 * 8 + 3] = True  # row 1, column 3
    out = np.asarray(kept_patch_overlay(_red_image(), keep, size=96))
    assert tuple(out[12 + 6, 36 + 6]) == (200, 30, 30)
    assert tuple(out[36 + 6, 12 + 6]) != (200, 30, 30)


def test_caption_adds_a_strip_below():
    out = kept_patch_overlay(_red_image(), [True] * 64, size=96, caption="what color is it ?\nanswer: red")
    assert out.width == 96 and out.height > 96


def test_pixels_round_trip_through_clip_normalisation():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    x = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert np.abs(np.asarray(pixels_to_image(x), dtype=int) - np.asarray(image, dtype=int)).max() <= 1


def test_panel_from_a_batch_is_one_image_wandb_accepts():
    pixels = torch.randn(5, 3, 96, 96)
    keep = torch.rand(5, 64) > 0.8
    panel = kept_patch_panel(pixels, keep.float(), captions=[f"q{i}" for i in range(5)], count=4, columns=2, size=96)
    assert isinstance(panel, Image.Image)
    assert panel.width > 2 * 96 and panel.height > 2 * 96
    wandb = pytest.importorskip("wandb")
    assert wandb.Image(panel).image is not None


# -- every family's own token grid (issue 13: Qwen2.5-VL / Qwen3-VL images of their own h x w) --------

QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def _noise(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _cells(rows, cols, cell, seed=0):
    """An image of ``rows`` x ``cols`` solid cells of ``cell`` px, each a distinct saturated (non-grey) colour."""
    rng = np.random.default_rng(seed)
    colours = [(int(rng.integers(120, 256)), int(rng.integers(0, 60)), i * 10) for i in range(rows * cols)]
    array = np.zeros((rows * cell, cols * cell, 3), dtype=np.uint8)
    for index, colour in enumerate(colours):
        r, c = divmod(index, cols)
        array[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = colour
    return Image.fromarray(array), colours


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_patches_invert_the_hf_image_processor(family):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from dllava.families import adapter_for
    from dllava.model.tiny_qwen import build_qwen_image_processor

    processor = build_qwen_image_processor(family)
    token_px = processor.patch_size * processor.merge_size
    # non-square both ways (a swapped h/w or merge order would scramble them) and one the processor resizes
    images = [_noise(3 * token_px, 2 * token_px, 0), _noise(2 * token_px, 4 * token_px, 1), _noise(150, 100, 2)]
    inputs = processor(images=images, return_tensors="pt")
    back = adapter_for(family).images_for_pictures(dict(inputs), processor)
    assert len(back) == 3
    for image, (t, h, w), picture in zip(images, inputs["image_grid_thw"].tolist(), back):
        height, width = smart_resize(image.height, image.width, factor=token_px,
                                     min_pixels=processor.size.shortest_edge, max_pixels=processor.size.longest_edge)
        assert picture.size == (width, height) == (w * processor.patch_size, h * processor.patch_size)
        # HF's PIL backend resizes with PIL's bicubic on uint8 (a no-op at multiples of token_px)
        resized = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=int)
        assert np.abs(np.asarray(picture, dtype=int) - resized).max() <= 1  # normalisation rounding only
    # without a processor the family's default statistics (the released checkpoints') apply; with one, its own
    default = adapter_for(family).images_for_pictures(dict(inputs))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(default, back))
    other = SimpleNamespace(image_mean=[0.0] * 3, image_std=[1.0] * 3, patch_size=processor.patch_size)
    plain = adapter_for(family).images_for_pictures(dict(inputs), other)
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(back[0]))


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_token_grids_are_each_images_merged_patch_grid(family):
    from dllava.families import adapter_for
    from dllava.model.tiny_qwen import (
        build_qwen_processor,
        tiny_qwen2_5_vl_config,
        tiny_qwen3_vl_config,
    )

    processor = build_qwen_processor(family)
    make = tiny_qwen2_5_vl_config if family == "qwen2_5_vl" else tiny_qwen3_vl_config
    config = make(processor.tokenizer)
    token_px = processor.image_processor.patch_size * 2
    sizes = [(3 * token_px, 2 * token_px), (2 * token_px, 4 * token_px), (4 * token_px, 4 * token_px)]
    inputs = processor.image_processor(images=[_noise(w, h, i) for i, (w, h) in enumerate(sizes)], return_tensors="pt")
    grids = adapter_for(family).token_grids(config, dict(inputs))
    assert grids == [(h // token_px, w // token_px) for w, h in sizes] == [(2, 3), (4, 2), (4, 4)]


def test_llava_pictures_are_the_clip_pixels_and_a_square_grid(tiny_model_dir, tiny_processor, tiny_image):
    from transformers import AutoConfig

    from dllava.families import adapter_for

    adapter = adapter_for("llava")
    pixels = tiny_processor.image_processor(images=[tiny_image, tiny_image], return_tensors="pt")["pixel_values"]
    pictures = adapter.images_for_pictures({"pixel_values": pixels}, tiny_processor)
    assert [np.asarray(p).tolist() for p in pictures] == [np.asarray(pixels_to_image(x)).tolist() for x in pixels]
    config = AutoConfig.from_pretrained(tiny_model_dir)
    side = int(config.image_seq_length ** 0.5)
    assert adapter.token_grids(config, {"pixel_values": pixels}) == [(side, side)] * 2
    # one question's (3, H, W) pixels are one image
    assert len(adapter.images_for_pictures({"pixel_values": pixels[0]}, tiny_processor)) == 1


def test_bad_patch_inputs_are_named():
    from dllava.eval.overlay import patches_to_images

    with pytest.raises(ValueError, match="patch rows expected"):
        patches_to_images(torch.zeros(10, 1176), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="3 channels x 2 frames"):
        patches_to_images(torch.zeros(16, 1000), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="whole 2x2 patch groups"):
        patches_to_images(torch.zeros(15, 1176), torch.tensor([[1, 3, 5]]))


def test_a_4x6_grid_draws_24_cells_with_the_kept_ones_outlined_at_their_boxes():
    image, colours = _cells(4, 6, 28)  # 168 x 112 px, as a Qwen2.5-VL image of 4 x 6 tokens
    keep = torch.zeros(24, dtype=torch.bool)
    keep[[0, 7, 11, 17, 23]] = True
    out = np.asarray(kept_patch_overlay(image, keep, size=240, grid=(4, 6)))
    assert out.shape == (160, 240, 3)  # the aspect ratio is kept: 40 px cells
    for index in range(24):
        row, col = divmod(index, 6)
        x0, y0, x1, y1 = col * 40, row * 40, col * 40 + 39, row * 40 + 39
        centre = tuple(out[y0 + 20, x0 + 20])
        corners = {tuple(out[y, x]) for y in (y0, y1) for x in (x0, x1)}
        if keep[index]:
            assert centre == colours[index]  # this cell of the image, in colour
            assert corners == {KEPT_COLOR}  # outlined on its own box
            assert tuple(out[y0 + 20, x0]) == tuple(out[y0 + 20, x1]) == KEPT_COLOR
            assert tuple(out[y0 + 4, x0 + 4]) == colours[index]  # the border is thin
        else:
            assert centre[0] == centre[1] == centre[2] < 120  # darkened grey
            assert KEPT_COLOR not in corners
    assert (out == KEPT_COLOR).all(-1).sum() > 0


def test_a_grid_needs_exactly_its_own_count_of_keep_entries():
    image, _ = _cells(4, 6, 28)
    padded = torch.zeros(36, dtype=torch.bool)  # a row padded to a 6 x 6 neighbour in the batch
    with pytest.raises(ValueError, match="cut a padded keep row"):
        kept_patch_overlay(image, padded, grid=(4, 6))
    with pytest.raises(ValueError, match="at least one row"):
        kept_patch_overlay(image, [], grid=(0, 6))


def test_panel_of_images_with_their_own_grids():
    images = [_cells(4, 6, 28)[0], _cells(6, 4, 28)[0], _cells(4, 4, 28)[0]]
    rows = [torch.rand(24) > 0.5, torch.rand(24) > 0.5, torch.ones(16)]
    panel = kept_patch_panel(images, rows, captions=["a", "b", "c"], grids=[(4, 6), (6, 4), (4, 4)], size=96, columns=3)
    assert isinstance(panel, Image.Image) and panel.width > 3 * 96
    # a (B, n_max) padded tensor with per-sample grids must be cut first: the error names it
    padded = torch.zeros(3, 24, dtype=torch.bool)
    with pytest.raises(ValueError, match="cut a padded keep row"):
        kept_patch_panel(images, padded, grids=[(4, 6), (6, 4), (4, 4)])


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_eval_overlays_of_qwen_questions_draw_each_images_own_grid(family, tmp_path):
    """Questions of three sizes answered in one padded batch: each example's keep row is cut to its own
    token count, and write_overlays draws it on that image (back from its patches) and its grid."""
    import importlib.util
    import json

    from dllava.eval import runner
    from dllava.eval.loading import LoadedModel
    from dllava.eval.questions import QuestionFile
    from dllava.model.tiny_qwen import build_tiny_qwen
    from dllava.sparse.model import DynamicVLM
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("eval_entry_pictures", ROOT / "eval.py")
    eval_entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_entry)

    base, processor = build_tiny_qwen(family)
    model = DynamicVLM(base, {"keep": 0.25, "layer": 2, "text_min_len": 16},
                       {"d_model": 32, "heads": 4, "ff": 64, "layers": 2}).eval()
    token_px = processor.image_processor.patch_size * 2
    shapes = [(4, 6), (4, 4), (6, 4)]  # (rows, cols) of tokens
    lines, colours = [], []
    for i, (rows, cols) in enumerate(shapes):
        image, cell_colours = _cells(rows, cols, token_px, seed=i)
        image.save(tmp_path / f"{i}.png")
        colours.append(cell_colours)
        lines.append({"question_id": i, "image": f"{i}.png", "text": "what color is the circle ?"})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    questions = list(QuestionFile(tmp_path / "q.jsonl", tmp_path, processor, adapter=model.adapter))
    assert [q.grid for q in questions] == shapes

    loaded = LoadedModel(model, processor, "tiny", str(tmp_path), "cpu")
    result = runner.evaluate_arm(loaded, questions, runner.Arm("dynamic", 0.25, "off"), batch_size=3,
                                 max_new_tokens=2, examples=3, progress=False, warmup=False)
    keeps = [keep for _, keep, _ in result.examples]
    assert [k.numel() for k in keeps] == [r * c for r, c in shapes]  # not the batch's padded 24
    assert [int(k.sum()) for k in keeps] == [r["metadata"]["image_tokens_kept"] for r in result.records]

    folder = eval_entry.write_overlays(result, tmp_path / "overlays", model.adapter, processor)
    pictures = sorted(folder.glob("*.png"))
    assert len(pictures) == 3 and (tmp_path / "overlays.png").is_file()
    for path, (rows, cols), keep, cell_colours in zip(pictures, shapes, keeps, colours):
        out = np.asarray(Image.open(path).convert("RGB"))
        cell = 384 // max(rows, cols)
        assert out.shape[1] == cols * cell and out.shape[0] > rows * cell  # the image's aspect, caption below
        for index, kept in enumerate(keep.tolist()):
            row, col = divmod(index, cols)
            centre = tuple(out[row * cell + cell // 2, col * cell + cell // 2])
            if kept:
                assert centre == cell_colours[index] and tuple(out[row * cell, col * cell]) == KEPT_COLOR
            else:
                assert centre[0] == centre[1] == centre[2]


def _captured_logger():
    """A W&B logger that keeps what it is given instead of starting a run."""
    from lightning.pytorch.loggers import WandbLogger

    class Captured(WandbLogger):
        def __init__(self):
            self.logged = []

        def log_image(self, key, images, step=None, **kwargs):
            self.logged.append((key, images, step))

    return Captured()


def _val_panel(module, batch, out, processor):
    """``module.log_kept_patches`` as validation calls it (rank zero, W&B logger), the logged panel back."""
    logger = _captured_logger()
    module._trainer = SimpleNamespace(loggers=[logger], sanity_checking=False, is_global_zero=True, global_step=7,
                                      datamodule=SimpleNamespace(processor=processor))
    try:
        module.log_kept_patches(batch, out)
    finally:
        module._trainer = None
    [(key, [panel], step)] = logger.logged
    assert key == "val/kept_patches" and step == 7 and isinstance(panel, Image.Image)
    return panel


_CONVERSATION = [{"from": "human", "value": "<image>\nwhat color is the circle ?"}, {"from": "gpt", "value": "red"}]
_PREDICTOR = {"d_model": 32, "heads": 4, "ff": 64, "layers": 2}


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_val_panel_draws_each_samples_own_grid_through_the_adapter(family, tmp_path):
    """The LightningModule's ``val/kept_patches`` on a Qwen batch of three image sizes: every sample's
    image back from the batch's flattened patches, its keep row cut by ``image_valid`` to its own count."""
    from dllava.data.datamodule import ChatSamplePreprocessor, collate
    from dllava.model.tiny_qwen import ImageTextProcessor, save_tiny_qwen
    from dllava.training.module import LlavaLitModule

    path = save_tiny_qwen(tmp_path / "base", family)
    processor = ImageTextProcessor.from_pretrained(path)
    module = LlavaLitModule(model={"pretrained": str(path), "predictor": _PREDICTOR},
                            sparsity={"keep": 0.25, "text_min_len": 16}, max_new_tokens=2)
    module.configure_model()
    module.eval()
    token_px = processor.image_processor.patch_size * 2
    shapes = [(4, 6), (2, 2), (6, 4)]
    preprocess = ChatSamplePreprocessor(processor, 512)
    samples = [preprocess({"key": str(i), "image": _cells(r, c, token_px, seed=i)[0], "record": {"conversations": _CONVERSATION}})
               for i, (r, c) in enumerate(shapes)]
    batch = collate(samples, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        out = module(batch, mode="eval")
    assert out.image_keep.shape == (3, 24) and out.image_valid.sum(-1).tolist() == [24, 4, 24]

    panel = _val_panel(module, batch, out, processor)
    # the same panel drawn by hand from each sample's own image, row and grid
    pictures = [_cells(r, c, token_px, seed=i)[0] for i, (r, c) in enumerate(shapes)]
    rows = [out.image_keep[i, : r * c] for i, (r, c) in enumerate(shapes)]
    expected = kept_patch_panel(pictures, rows, captions=batch["questions"], grids=shapes)
    assert np.abs(np.asarray(panel, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_val_panel_of_a_llava_batch_is_unchanged(tiny_model_dir, tiny_processor):
    """LLaVA through the adapter draws what the square-grid panel of the stacked pixels always drew."""
    from dllava.data.datamodule import collate
    from dllava.families import adapter_for
    from dllava.training.module import LlavaLitModule

    module = LlavaLitModule(model={"pretrained": str(tiny_model_dir), "predictor": _PREDICTOR},
                            sparsity={"keep": 0.25, "text_min_len": 16}, max_new_tokens=2)
    module.configure_model()
    module.eval()
    preprocess = adapter_for("llava").sample_preprocessor(tiny_processor, 512)
    samples = [preprocess({"key": str(i), "image": _noise(96, 64, i), "record": {"conversations": _CONVERSATION}})
               for i in range(3)]
    batch = collate(samples, tiny_processor.tokenizer.pad_token_id)
    with torch.no_grad():
        out = module(batch, mode="eval")
    panel = _val_panel(module, batch, out, tiny_processor)
    expected = kept_patch_panel(batch["pixel_values"], out.image_keep, captions=batch["questions"])
    assert np.array_equal(np.asarray(panel), np.asarray(expected))


def test_panel_grid_draws_each_panel_on_its_own_part_of_the_picture():
    """A 2x2 base view beside a 2x(3+1) stitched grid: picture 2 + 4 = 6 cells wide, each keep entry on
    its own panel's cell (base tokens first, then the stitched rows with their newline column)."""
    from dllava.eval.overlay import PanelGrid

    image, colours = _cells(2, 6, 20)  # 120 x 40 px: columns 0-1 base view, 2-4 crops, 5 newline strip
    grid = PanelGrid(((2, 2), (2, 4)))
    assert grid.tokens == 12 and grid.spans(120) == [(0, 40), (40, 120)]
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[3, 4 + 1, 4 + 7]] = True  # base (1, 1); stitched (0, 1); stitched row 1's newline
    out = np.asarray(kept_patch_overlay(image, keep, size=120, grid=grid))
    assert out.shape == (40, 120, 3)
    for row, col in [(1, 1), (0, 3), (1, 5)]:  # picture cells of the three kept tokens
        assert tuple(out[row * 20 + 10, col * 20 + 10]) == colours[row * 6 + col]
        assert tuple(out[row * 20, col * 20]) == KEPT_COLOR
    assert tuple(out[10, 10])[0] == tuple(out[10, 10])[1] < 120  # base (0, 0) dropped: darkened grey
    with pytest.raises(ValueError, match="do not fill the panels"):
        kept_patch_overlay(image, torch.zeros(11, dtype=torch.bool), grid=grid)


def test_anyres_pictures_show_the_base_view_and_the_unpadded_crops(tmp_path):
    """A 40 x 96 px image on the tiny NeXT (2x3 crops of 32 px: padded to 64 px high, 12 px above and
    below; HF's unpadding keeps patch rows 1-6 of 8, i.e. px 8-56): the picture is base view | stitched
    crops | newline strip, laid out as the adapter's token panels, and the crop panel shows exactly the
    window the kept tokens cover: the image, plus the 4 px of padding above and below that HF's
    patch-granular unpadding leaves in."""
    from dllava.families import adapter_for
    from dllava.model.tiny_next import save_tiny_next

    path = save_tiny_next(tmp_path / "next", "llava_next", num_hidden_layers=1)
    adapter = adapter_for("llava_next")
    processor = adapter.load_processor(str(path))
    config = adapter.model_class().config_class.from_pretrained(path)
    stripes = np.zeros((40, 96, 3), dtype=np.uint8)
    stripes[:, :48] = (250, 20, 20)
    stripes[:, 48:] = (20, 20, 250)
    pixels = processor.pixel_inputs([Image.fromarray(stripes)])
    (grid,) = adapter.token_grids(config, pixels)
    (picture,) = adapter.images_for_pictures(pixels, processor)
    rows, cols_plus_newline = grid.panels[1]
    assert grid.panels[0] == (4, 4) and cols_plus_newline == 13 and rows * 12 == picture.height
    assert picture.width == picture.height + cols_plus_newline * 12
    crops = np.asarray(picture)[:, picture.height : picture.width - 12].astype(int)
    inner = crops[8:-8]  # 48 px of window -> 72 px of picture: 4 px of padding = 6 px at each edge
    half = inner.shape[1] // 2
    assert (inner[:, : half - 4, 0] > 200).all() and (inner[:, half + 4 :, 2] > 200).all()
    assert crops[:4].max() < 40 and crops[-4:].max() < 40  # the padding the edge tokens still cover
    with pytest.raises(ValueError, match="AnyresProcessor"):
        adapter.images_for_pictures(pixels, processor.image_processor)
