"""PS buffers: one resident merged copy of the base architecture, rewritten in place per PS candidate.

Memory is the sources plus one merged copy (docs/design.md section 4). Each :class:`~dfsmerge.genome.PSRecipe` is
applied tensor by tensor with the merge library (:func:`dfsmerge.merge.merge_tensor`), or on CUDA with the fused
kernels writing straight into the parameter's storage (:func:`dfsmerge.kernels.fused_merge` with ``out=``), so
parameter objects and storage pointers never change: modules that hold them (a stitched model, an optimizer's
view) see the new weights at once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from dfsmerge.arch import get_architecture
from dfsmerge.errors import ConfigError

if TYPE_CHECKING:
    from dfsmerge.genome import PSRecipe


class PSBuffers:
    """The merged model's resident tensors.

    Args:
        sources: model name -> resident ``*ForCausalLM`` (the pool's models); names are those of the PS genome.
        template: the model whose architecture and config the merged copy takes (usually the base model).
        seed: seed of random merge methods (DARE/DELLA), per tensor derived from (seed, tensor name).
        use_kernels: ``True``: the fused kernels on CUDA tensors, the merge library elsewhere; ``"always"``: the
            fused entry point on every device (its PyTorch reference off CUDA; for tests); ``False``: the library.
        keep_mb: keep copies of merged weights up to this many MiB, so a recipe applied again (racing scores a
            candidate block by block, between the other candidates' blocks) is copied back instead of merged again;
            0: never. Copies are kept first come, first served until :meth:`forget`.

    Attributes:
        model: the merged ``*ForCausalLM`` (a copy of ``template``'s structure; its tensors are overwritten by
            :meth:`apply`).
        merges: recipes merged so far; restores: recipes copied back from a kept copy.
    """

    def __init__(self, sources: Mapping[str, nn.Module], template: str, *, seed: int = 0,
                 use_kernels: bool | str = True, keep_mb: float = 0):
        if template not in sources:
            raise ConfigError(f"PSBuffers: template={template!r} is not one of the sources {list(sources)}")
        self.sources = dict(sources)
        self.seed = seed
        self.use_kernels = use_kernels
        self.model = copy.deepcopy(sources[template])  # the one merged copy
        self.model.requires_grad_(False)
        cfg = self.model.config.to_dict()
        self.architecture = get_architecture(cfg)
        self.names = self.architecture.all_tensor_names(cfg)
        self._post = set(self.architecture.post_tensor_names(cfg))
        self._dst = self._tensors(self.model)
        self._src = {k: self._tensors(m) for k, m in self.sources.items()}
        self.recipe: PSRecipe | None = None
        self.keep_bytes = int(keep_mb * 2**20)
        self._bytes = sum(t.numel() * t.element_size() for t in self._dst.values())  # one kept copy
        self._kept: dict[PSRecipe, list[torch.Tensor]] = {}
        self.merges = self.restores = 0

    def forget(self) -> None:
        """Drop every kept copy (their recipes will not come back: a race is over)."""
        self._kept.clear()

    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        sd = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise ConfigError(f"PSBuffers: model lacks tensors {missing[:5]}; all PS sources need one architecture")
        return {n: sd[n] for n in self.names}

    def apply(self, recipe: PSRecipe) -> nn.Module:
        """Overwrite the merged tensors with ``recipe``'s merge (in place); return the merged model.

        Raises:
            ConfigError: the recipe names a model that is not a source.
            MergeError: from the merge library (bad parameters for the method).
        """
        from dfsmerge.merge import merge_tensor, tensor_seed

        g = recipe.genome
        missing = [m for m in g.inputs if m not in self._src]
        if missing:
            raise ConfigError(f"PS recipe uses models {missing} that are not loaded; sources are {list(self._src)}")
        kept = self._kept.get(recipe)
        if kept is not None:
            with torch.no_grad():
                for name, t in zip(self.names, kept, strict=True):
                    self._dst[name].copy_(t)
            self.recipe = recipe
            self.restores += 1
            return self.model
        base_index = g.inputs.index(g.base_model) if g.base_model is not None else None
        fused = self._fused()
        with torch.no_grad():
            for name in self.names:
                layer = self.architecture.layer_index(name)
                per_input, glob = recipe.tensor_params(name, layer, post=name in self._post)
                tensors = [self._src[m][name] for m in g.inputs]
                out = self._dst[name]
                if fused is not None and (out.is_cuda or self.use_kernels == "always") and g.merge_method in fused[1]:
                    # per-tensor seed as the merge library's, so tensors of one shape get independent masks
                    # (the Triton kernels' Philox stream differs from torch's: DARE/DELLA masks differ from the
                    # library's for the same seed, as dfsmerge.kernels documents)
                    fused[0](g.merge_method, tensors, base_index=base_index, params=per_input, global_params=glob,
                             seed=tensor_seed(self.seed, name), out=out)
                else:
                    merged = merge_tensor(g.merge_method, tensors, base_index=base_index, params=per_input,
                                          global_params=glob, seed=self.seed, name=name)
                    out.copy_(merged)
        self.recipe = recipe
        self.merges += 1
        if (len(self._kept) + 1) * self._bytes <= self.keep_bytes:
            self._kept[recipe] = [self._dst[n].detach().clone() for n in self.names]
        return self.model

    def _fused(self):
        if not self.use_kernels:
            return None
        try:
            from dfsmerge.kernels import METHOD_NAMES, fused_merge
        except ImportError:
            return None
        return fused_merge, set(METHOD_NAMES)
