"""The explicit counterpart of SAM under label noise that Baek, Kolter and Raghunathan (ICLR
2024) derive: penalties on the features the classifier's last linear layer reads and on that
layer's weight, added to the training loss at the cost of one forward hook::

    loss = CE(logits, y) + feature_penalty * mean_i ||h_i||^2 + head_penalty * ||W||_F^2

``h_i`` (shape ``(batch, features)``) is the input of the model's last :class:`~torch.nn.Linear`
for example ``i``, ``W`` (shape ``(classes, features)``) its weight. Both are computed in float32
under autocast. Off (no hook at all) when both coefficients are 0."""

from __future__ import annotations

from torch import Tensor, nn


def output_layer(model: nn.Module) -> nn.Linear:
    """The model's last :class:`~torch.nn.Linear` in module order: the classifier of every
    registered model (the registry's tests check that its output is the logits)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer, so the feature and head penalties "
            "have nothing to act on; set them to 0"
        )
    return linears[-1]


class HeadPenalties:
    """The penalties of the last forward pass through ``model``: call it after the forward."""

    def __init__(self, model: nn.Module, *, feature: float, head: float) -> None:
        if feature < 0 or head < 0:
            raise ValueError(f"penalties must be >= 0, got feature {feature}, head {head}")
        self.feature, self.head = feature, head
        self.layer = output_layer(model)
        self._features: Tensor | None = None
        self._hook = self.layer.register_forward_pre_hook(self._keep) if feature else None

    def _keep(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._features = inputs[0]

    def __call__(self) -> Tensor:
        """The penalty (a float32 scalar) of the forward just run; raises if there was none."""
        total = self.head * self.layer.weight.float().pow(2).sum()
        if self.feature:
            if self._features is None:
                raise RuntimeError("HeadPenalties was called before a forward pass")
            features, self._features = self._features.float(), None
            total = total + self.feature * features.flatten(1).pow(2).sum(1).mean()
        return total

    def remove(self) -> None:
        """Take the hook off the model."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def head_penalties(model: nn.Module, feature: float, head: float) -> HeadPenalties | None:
    """:class:`HeadPenalties` of ``model``, or None when both coefficients are 0."""
    return HeadPenalties(model, feature=feature, head=head) if feature or head else None
