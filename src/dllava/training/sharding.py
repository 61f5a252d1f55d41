"""FSDP2 (``fully_shard``) for a DynamicVLM, and the helpers sharded training needs around it.

Units: the family adapter's ``fsdp_units`` (every vision block and every decoder layer: the classes of
HF's ``_no_split_modules``) are each their own FSDP unit (all-gathered just before their forward, freed
after); everything else (embeddings, projector/merger, final norm, LM head and the predictors) is the
root unit. Parameters become ``DTensor`` s sharded over the data-parallel mesh, and
the optimizer built afterwards (``configure_optimizers`` runs after ``configure_model``) holds shards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder layers of a DynamicVLM (through its family adapter)."""
    return model.adapter.decoder(model.base).layers


def vision_layers(model: nn.Module) -> list[nn.Module]:
    """The vision-tower blocks of a DynamicVLM (through its family adapter)."""
    return list(model.adapter.vision_layers(model.base))


def empty_base_model(source: Any) -> nn.Module:
    """The base model of ``source`` (a ``ModelSource``) on the meta device: shapes and dtype, no memory.

    Under ``trainer=fsdp`` every rank but 0 builds this; FSDP (``sync_module_states``) materialises it
    on the rank's GPU (:func:`materialize_empty`) and broadcasts rank 0's weights, so only rank 0 holds
    a full copy in host memory while the model is set up.
    """
    from dllava.model.loading import build_empty

    return build_empty(source, "meta")


empty_llava = empty_base_model  # its name before the family seam


def materialize_empty(module: nn.Module) -> None:
    """FSDP ``param_init_fn``: allocate a meta module's own tensors on this rank's GPU (values follow
    from rank 0 through ``sync_module_states``)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    module.to_empty(device=device, recurse=False)


def shard_fsdp2(model: nn.Module, mesh: Any, activation_checkpointing: bool = False) -> nn.Module:
    """Apply ``fully_shard`` in place: one unit per vision/decoder layer, then the root.

    ``activation_checkpointing`` uses HF's own layer checkpointing on the decoder layers (non-reentrant;
    it checkpoints ``forward`` so FSDP2's hooks stay outside the recomputation). Methods other than
    ``forward`` that read root parameters (``generate_greedy``) are registered so FSDP2 gathers them.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if activation_checkpointing:
        lm = model.adapter.decoder(model.base)
        # transformers >= 5.23 names it activation_checkpointing_enable (the old name is deprecated)
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    for layer in model.adapter.fsdp_units(model.base):
        fully_shard(layer, mesh=mesh)
    if getattr(model, "sparsity", None) is not None and model.sparsity.enabled:
        fully_shard(model, mesh=mesh)
        register_fsdp_forward_method(model, "generate_greedy")
    else:  # dense: DynamicVLM.forward is the plain HF forward, and HF generate is called on the base
        fully_shard(model.base, mesh=mesh)
        register_fsdp_forward_method(model.base, "generate")
    return model


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter is a DTensor (FSDP2) or the module sits in an FSDP1 wrapper."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters()) or any(
        type(m).__name__ == "FullyShardedDataParallel" for m in module.modules()
    )


def parameter_types(module: nn.Module) -> dict[str, str]:
    """``{parameter name: "DTensor" or "Tensor"}``, for checks and reports."""
    from torch.distributed.tensor import DTensor

    return {name: "DTensor" if isinstance(p, DTensor) else "Tensor" for name, p in module.named_parameters()}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (a collective: every rank must call it; rank 0 gets the tensors)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded, CPU) DynamicVLM with ``state`` (from :func:`full_state_dict`), for export."""
    import copy

    from dllava.sparse.model import DynamicVLM

    with torch.device("meta"):
        base = model.adapter.model_class()(copy.deepcopy(model.base.config))
        plain = DynamicVLM(base, model.sparsity, model.predictor_config)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


class FamilyUnits:
    """FSDP1 auto-wrap (or activation-checkpointing) policy: exactly the family adapter's units.

    Lightning's ``FSDPStrategy`` takes its policy before the model exists, so a set of layer classes in
    the config would name one family's classes. This callable finds the :class:`DynamicVLM` under the
    root FSDP hands it first and wraps the modules its adapter lists: ``parts="all"`` every vision block
    and decoder layer (``fsdp_units``, the classes of HF's ``_no_split_modules``), ``"decoder"`` the
    decoder layers only (what activation checkpointing recomputes). Signature: FSDP's
    ``(module, recurse, nonwrapped_numel)`` policy protocol.
    """

    PARTS = ("all", "decoder")

    def __init__(self, parts: str = "all") -> None:
        if parts not in self.PARTS:
            raise ValueError(f"FamilyUnits parts must be one of {self.PARTS}, got {parts!r}")
        self.parts = parts
        self._units: set[int] | None = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if self._units is None:
            self._units = {id(m) for m in self.units(module)}
        return True if recurse else id(module) in self._units

    def units(self, root: nn.Module) -> list[nn.Module]:
        """The modules to wrap under ``root`` (which holds exactly one DynamicVLM)."""
        models = [m for m in root.modules() if hasattr(m, "adapter") and hasattr(m, "base")]
        if len(models) != 1:
            raise ValueError(f"FamilyUnits needs exactly one DynamicVLM under the wrapped module, found {len(models)}")
        model = models[0]
        if self.parts == "decoder":
            return list(decoder_layers(model))
        return model.adapter.fsdp_units(model.base)
