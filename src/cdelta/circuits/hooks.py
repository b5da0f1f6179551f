"""Plain-PyTorch hooks on the nodes of a transformers decoder.

Nodes and the tensors that represent them ("sites"):

* attention heads of layer ``l``: the input of ``o_proj`` (the concatenated per-head
  outputs before the output projection), viewed as ``[batch, seq, n_heads, head_dim]``;
  head ``h`` is ``[..., h, :]``. Site ``(l, "attn")``.
* MLP block of layer ``l``: the MLP module's output ``[batch, seq, d_model]``.
  Site ``(l, "mlp")``.
* the token embeddings (output of the input embedding module), ``[batch, seq, d_model]``.
  Site ``(-1, "embed")``; it is not a node, only used by input-interpolating methods.

``SiteHooks`` installs one hook per site and calls ``handler(site, tensor)``; the
handler returns the tensor the model should use from there on (the same tensor to
leave it unchanged). Always returning a tensor keeps it in the autograd graph, so
``torch.autograd.grad(metric, kept_tensors)`` gives gradients of the metric with
respect to node outputs. With ``grad_root=True`` the embedding output is made a
gradient root (the model's parameters need not require grad).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import torch

from cdelta.models.architecture import Architecture, head_output_proj, mlp

ATTN = "attn"
MLP = "mlp"
EMBED = "embed"
EMBED_SITE = (-1, EMBED)

Site = tuple[int, str]
Handler = Callable[[Site, torch.Tensor], torch.Tensor]


def node_sites(arch: Architecture) -> list[Site]:
    """All node sites in forward order: ``(0, attn), (0, mlp), (1, attn), ...``."""
    return [(layer, kind) for layer in range(arch.n_layers) for kind in (ATTN, MLP)]


def node_ids(arch: Architecture) -> list[str]:
    """Node ids in canonical order (layer-major; heads then MLP): ``L0.H0 … L0.H{n-1}, L0.MLP, L1.H0, …``.

    This order matches score tensors of shape ``[n_layers, n_heads + 1]`` flattened.
    """
    ids = []
    for layer in range(arch.n_layers):
        ids += [f"L{layer}.H{h}" for h in range(arch.n_heads)]
        ids.append(f"L{layer}.MLP")
    return ids


def parse_node_id(node: str) -> tuple[int, int | None]:
    """``"L12.H3" -> (12, 3)``; ``"L12.MLP" -> (12, None)``."""
    layer_part, _, kind = node.partition(".")
    if not layer_part.startswith("L") or not kind:
        raise ValueError(f"bad node id {node!r}")
    layer = int(layer_part[1:])
    if kind == "MLP":
        return layer, None
    if kind.startswith("H"):
        return layer, int(kind[1:])
    raise ValueError(f"bad node id {node!r}")


class SiteHooks:
    """Context manager calling ``handler(site, tensor)`` at every site during forward passes."""

    def __init__(self, model: torch.nn.Module, arch: Architecture, handler: Handler, grad_root: bool = False) -> None:
        self.model, self.arch, self.handler, self.grad_root = model, arch, handler, grad_root
        self._handles: list = []

    def __enter__(self) -> SiteHooks:
        arch = self.arch

        def embed_hook(module, args, output):
            out = output
            if self.grad_root:
                out = out.detach().requires_grad_(True)
            return self.handler(EMBED_SITE, out)

        self._handles.append(self.model.get_input_embeddings().register_forward_hook(embed_hook))
        for layer in range(arch.n_layers):

            def attn_hook(module, args, layer=layer):
                x = args[0]
                heads = x.view(*x.shape[:-1], arch.n_heads, arch.head_dim)
                out = self.handler((layer, ATTN), heads)
                return (out.reshape(x.shape),) + tuple(args[1:])

            def mlp_hook(module, args, output, layer=layer):
                return self.handler((layer, MLP), output)

            self._handles.append(head_output_proj(self.model, layer).register_forward_pre_hook(attn_hook))
            self._handles.append(mlp(self.model, layer).register_forward_hook(mlp_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def cache_argument(model: torch.nn.Module) -> str:
    """Name of ``model.forward``'s KV-cache argument: ``cache`` (transformers ≥ 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def run_model(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    past_key_values=None,
) -> torch.Tensor:
    """Logits ``[batch, logits_to_keep, vocab]`` of the last positions.

    With ``past_key_values`` (a cache of the first ``S - len`` positions), ``input_ids``
    holds only the remaining positions and ``attention_mask`` covers all ``S``; the cache
    is copied first, so the same cache can be reused by many runs.
    """
    if past_key_values is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, use_cache=False)
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{cache_argument(model): copy.deepcopy(past_key_values)},
        )
    return out.logits


def run_with_handler(
    model: torch.nn.Module,
    arch: Architecture,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    handler: Handler,
    grad_root: bool = False,
    past_key_values=None,
) -> torch.Tensor:
    """One forward pass with ``handler`` installed at every site; returns logits."""
    with SiteHooks(model, arch, handler, grad_root=grad_root):
        return run_model(model, input_ids, attention_mask, logits_to_keep, past_key_values)


class Recorder:
    """Handler that stores a detached copy of every site's tensor and changes nothing."""

    def __init__(self) -> None:
        self.acts: dict[Site, torch.Tensor] = {}

    def __call__(self, site: Site, tensor: torch.Tensor) -> torch.Tensor:
        self.acts[site] = tensor.detach().clone()
        return tensor


def replace_where(tensor: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` where ``mask`` (broadcast over trailing dims), else ``tensor``."""
    while mask.dim() < tensor.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, values.to(tensor.dtype), tensor)
