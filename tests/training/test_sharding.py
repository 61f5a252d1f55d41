"""FSDP2 sharding of a DynamicLlava, and the training pieces that must hold under sharding."""

import pytest
import torch

from dllava.training.module import PARTS, cut_after_eos, part_of, step_seed


@pytest.mark.parametrize(
    "name, part",
    [
        # FSDP1 (use_orig_params) and activation checkpointing insert wrapper names mid-path
        ("llava.model.language_model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.weight", "llm"),
        ("llava.model.vision_tower.vision_model.encoder.layers.1._fsdp_wrapped_module.mlp.fc1.weight", "vision"),
        ("llava.model.multi_modal_projector.linear_1.weight", "projector"),
        ("image_predictor.blocks.0.mlp.0.weight", "predictors"),
        ("text_predictor.head.0.bias", "predictors"),
        ("llava.lm_head.weight", "llm"),
    ],
)
def test_learning_rate_groups_follow_parameter_names_under_fsdp_wrappers(name, part):
    assert part_of(name) == part
    assert all(not prefix.startswith("_fsdp") for _, prefix in PARTS)


def test_step_seed_depends_only_on_the_position_in_the_run():
    seeds = {step_seed(1234, step, micro, rank) for step in range(4) for micro in range(2) for rank in range(2)}
    assert len(seeds) == 16  # every micro-batch on every rank draws its own noise
    assert step_seed(1234, 3, 1, 0) == step_seed(1234, 3, 1, 0)
    assert step_seed(1234, 3, 1, 0) != step_seed(1235, 3, 1, 0)


def test_cut_after_eos_pads_what_early_stopping_would_not_have_generated():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert cut_after_eos(tokens, eos_token_id=2, pad_token_id=0).tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]


@pytest.fixture
def gloo_world_of_one(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sparse", [True, False], ids=["dynamic", "dense"])
def test_shard_fsdp2_makes_every_parameter_a_dtensor_and_keeps_training_and_generation(tiny_model_dir, gloo_world_of_one, sparse):
    from dllava.model.loading import load_llava
    from dllava.sparse.model import DynamicLlava
    from dllava.training.sharding import is_sharded, parameter_types, shard_fsdp2

    torch.manual_seed(0)
    llava = load_llava({"pretrained": str(tiny_model_dir)}).train()
    sparsity = {"vision": sparse, "text": sparse, "text_min_len": 2}
    model = DynamicLlava(llava, sparsity, {"d_model": 16, "heads": 2, "ff": 32, "layers": 1} if sparse else None)
    for name, param in model.named_parameters():  # as stage=sparsify: CLIP frozen
        param.requires_grad_(part_of(name) != "vision")
    config = llava.config
    n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    ids = torch.randint(3, 60, (2, n_image + 12))
    ids[:, 1 : 1 + n_image] = config.image_token_id
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                 pixel_values=torch.randn(2, 3, config.vision_config.image_size, config.vision_config.image_size))
    span = torch.tensor([[n_image + 4, n_image + 12]] * 2)
    reference = model(**batch, answer_span=span, mode="eval").lm_loss.item()

    shard_fsdp2(model, gloo_world_of_one, activation_checkpointing=True)
    assert is_sharded(model) and set(parameter_types(model).values()) == {"DTensor"}
    assert model(**batch, answer_span=span, mode="eval").lm_loss.item() == pytest.approx(reference, abs=1e-5)

    out = model(**batch, answer_span=span, mode="train", tau=1.0)
    out.lm_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    if sparse:
        assert any(n.startswith("text_predictor.") for n in grads)  # used even if no answer is eligible
        new, _ = model.generate_greedy(ids[:, : n_image + 4], torch.ones_like(ids[:, : n_image + 4]),
                                       batch["pixel_values"], 2, eos_token_id=-1, pad_token_id=0)
    else:
        new = model.llava.generate(input_ids=ids[:, : n_image + 4], pixel_values=batch["pixel_values"],
                                   max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert new.shape[0] == 2 and new.shape[-1] >= 2


def test_ranks_receiving_fsdp_weights_build_an_empty_model_of_the_same_shape(tiny_model_dir):
    from dllava.model.loading import ModelSource, load_llava
    from dllava.training.sharding import empty_llava

    source = ModelSource(pretrained=str(tiny_model_dir))
    loaded, empty = load_llava(source).state_dict(), empty_llava(source).state_dict()
    assert loaded.keys() == empty.keys()
    assert all(empty[k].is_meta and empty[k].shape == loaded[k].shape and empty[k].dtype == loaded[k].dtype for k in loaded)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision"])
def test_fsdp1_policy_wraps_each_familys_own_blocks(family, tiny_model_dir, tmp_path):
    """trainer=fsdp's FamilyUnits, run through FSDP's own module traversal (``_recursive_wrap``) with a
    plain wrapper instead of FSDP (no process group needed): it wraps every instance of the family's
    block classes (Qwen: HF's ``_no_split_modules``; LLaVA: its layer classes, as the config named them
    before the seam, not the embeddings HF also lists), and for activation checkpointing only the
    decoder layers."""
    from torch import nn
    from torch.distributed.fsdp.wrap import _recursive_wrap

    from dllava.families import adapter_for
    from dllava.model.tiny_qwen import save_tiny_qwen
    from dllava.sparse.model import DynamicVLM
    from dllava.training.sharding import FamilyUnits

    class Wrapped(nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            self.inner = module

    from dllava.model.tiny_next import save_tiny_next

    if family == "llava":
        path = tiny_model_dir
    elif family.startswith("llava_"):
        path = save_tiny_next(tmp_path / family, family, num_hidden_layers=2)
    else:
        path = save_tiny_qwen(tmp_path / family, family)
    base = adapter_for(family).model_class().from_pretrained(path)
    no_split = set(base.model._no_split_modules)
    if family.startswith("llava"):  # HF also lists embeddings and (SigLIP) the pooling head: not units here
        no_split = {"CLIPEncoderLayer", "SiglipEncoderLayer", "LlamaDecoderLayer", "Qwen2DecoderLayer"}
    root = nn.ModuleDict({"model": DynamicVLM(base, {"vision": False, "text": False})})
    expected = {name for name, m in root.named_modules() if type(m).__name__ in no_split}
    decoder = {name for name, m in root.named_modules() if type(m).__name__ in no_split and "language_model" in name}
    for parts, want in (("all", expected), ("decoder", decoder)):
        tree = nn.ModuleDict({"model": DynamicVLM(adapter_for(family).model_class().from_pretrained(path), {"vision": False, "text": False})})
        _recursive_wrap(tree, auto_wrap_policy=FamilyUnits(parts), wrapper_cls=Wrapped, ignored_modules=set(), ignored_params=set())
        wrapped = {name.replace(".inner", "") for name, m in tree.named_modules() if isinstance(m, Wrapped)}
        assert wrapped == want and len(want) > 0


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_newline_embedding_trains_with_the_projector(family, tmp_path):
    """The learned image_newline is part of the projector group (LLaVA-NeXT trains it with the projector);
    the towers' blocks are vision, the decoder llm: every parameter of the tiny model lands in one part."""
    from dllava.families import adapter_for
    from dllava.model.tiny_next import save_tiny_next
    from dllava.sparse.model import DynamicVLM

    adapter = adapter_for(family)
    base = adapter.model_class().from_pretrained(save_tiny_next(tmp_path / family, family, num_hidden_layers=1))
    model = DynamicVLM(base, {"vision": False, "text": False})
    parts = {name: part_of(name, adapter) for name, _ in model.named_parameters()}
    assert [part for name, part in parts.items() if name.endswith("image_newline")] == ["projector"]
    assert {part for name, part in parts.items() if "vision_tower" in name} == {"vision"}
    assert {part for name, part in parts.items() if "language_model" in name or "lm_head" in name} == {"llm"}
