"""Prediction heads on the study embedding.

Prima gives every diagnosis its own MLP (Linear 10240->4000, ReLU, Linear 4000->1000, ReLU, Linear 1000->52)
and reads one column of it minus a per-head threshold (``reference/prima.md`` §5). 52 heads called one after the
other are 52 x 3 small GEMMs; :class:`StackedMLPHeads` keeps the heads' weights stacked and evaluates them all at
once (one GEMM for the shared first layer, batched matmuls after it, only the needed column of the last layer),
while its state dict keeps the per-head layout ``{k}.{0,2,4}.{weight,bias}`` so checkpoints load both ways.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """Linear/ReLU stack with keys 0, 2, 4, ... (the priority head)."""
    dims = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class StackedMLPHeads(nn.Module):
    """``n_heads`` independent MLPs over one input; head k outputs column ``column[k]`` minus ``threshold[k]``.

    ``column`` and ``threshold`` are not part of the state dict (the reference keeps them on the pickled head
    objects; our bundles keep them in the manifest); set them with :meth:`set_columns_and_thresholds`.
    """

    def __init__(self, n_heads: int, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dims = (in_features, *hidden, out_features)
        for layer in range(len(self.dims) - 1):
            fan_in, fan_out = self.dims[layer], self.dims[layer + 1]
            self.register_parameter(f"weight_{layer}", nn.Parameter(torch.empty(n_heads, fan_out, fan_in)))
            self.register_parameter(f"bias_{layer}", nn.Parameter(torch.empty(n_heads, fan_out)))
        self.register_buffer("column", torch.arange(n_heads) % out_features, persistent=False)
        self.register_buffer("threshold", torch.zeros(n_heads), persistent=False)
        self.reset_parameters()

    @property
    def n_layers(self) -> int:
        return len(self.dims) - 1

    def weight(self, layer: int) -> nn.Parameter:
        return getattr(self, f"weight_{layer}")

    def bias(self, layer: int) -> nn.Parameter:
        return getattr(self, f"bias_{layer}")

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, head by head."""
        if self.weight(0).is_meta:
            return
        for layer in range(self.n_layers):
            bound = 1 / math.sqrt(self.dims[layer])
            for k in range(self.n_heads):
                nn.init.kaiming_uniform_(self.weight(layer)[k], a=math.sqrt(5))
            nn.init.uniform_(self.bias(layer), -bound, bound)

    def set_columns_and_thresholds(self, columns: Sequence[int], thresholds: Sequence[float]) -> None:
        if len(columns) != self.n_heads or len(thresholds) != self.n_heads:
            raise ValueError(
                f"need {self.n_heads} columns and thresholds, got {len(columns)} and {len(thresholds)}"
            )
        if not all(0 <= c < self.dims[-1] for c in columns):
            raise ValueError(f"columns must lie in 0..{self.dims[-1] - 1}: {list(columns)}")
        self.column = torch.as_tensor(list(columns), dtype=torch.long, device=self.threshold.device)
        self.threshold = torch.as_tensor(list(thresholds), dtype=torch.float32, device=self.threshold.device)

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in) -> (B, n_heads, last hidden width): every head's input to its last layer."""
        first = self.weight(0)
        h = x @ first.reshape(-1, first.shape[-1]).T + self.bias(0).reshape(-1)  # one GEMM for all heads
        h = torch.relu(h.view(x.shape[0], self.n_heads, -1))
        for layer in range(1, self.n_layers - 1):
            h = torch.relu(torch.einsum("bhi,hoi->bho", h, self.weight(layer)) + self.bias(layer))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in) -> (B, n_heads): each head's own column minus its threshold."""
        heads = torch.arange(self.n_heads, device=x.device)
        last = self.n_layers - 1
        weight = self.weight(last)[heads, self.column]  # (n_heads, hidden): only the columns we read
        bias = self.bias(last)[heads, self.column]
        h = self._hidden(x)
        return torch.einsum("bhi,hi->bh", h, weight.to(h.dtype)) + bias - self.threshold

    def all_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in) -> (B, n_heads, out): every column of every head, no threshold (training, debugging)."""
        last = self.n_layers - 1
        return torch.einsum("bhi,hoi->bho", self._hidden(x), self.weight(last)) + self.bias(last)

    # --- per-head state-dict layout: "{k}.{2 * layer}.weight" / ".bias", as an nn.Sequential per head ---

    def _per_head_key(self, prefix: str, head: int, layer: int, kind: str) -> str:
        return f"{prefix}{head}.{2 * layer}.{kind}"

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for layer in range(self.n_layers):
            for kind, tensor in (("weight", self.weight(layer)), ("bias", self.bias(layer))):
                for head in range(self.n_heads):
                    value = tensor[head]
                    destination[self._per_head_key(prefix, head, layer, kind)] = (
                        value if keep_vars else value.detach()
                    )

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        expected = set()
        for layer in range(self.n_layers):
            for kind, tensor in (("weight", self.weight(layer)), ("bias", self.bias(layer))):
                for head in range(self.n_heads):
                    key = self._per_head_key(prefix, head, layer, kind)
                    expected.add(key)
                    if key not in state_dict:
                        missing_keys.append(key)
                        continue
                    value = state_dict[key]
                    if value.shape != tensor.shape[1:]:
                        error_msgs.append(
                            f"size mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(tensor.shape[1:])}"
                        )
                        continue
                    with torch.no_grad():
                        tensor[head].copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)
