"""``Augment``: batched random crop and flip, replayed against a per-image reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from gcsam.toolkit.data import Augment


def test_augment_shape_and_determinism() -> None:
    images = torch.randn(16, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    saved = gen.get_state()
    aug = Augment(crop_padding=2, generator=gen)
    out = aug(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert not torch.equal(aug(images), out)  # the generator moved on
    gen.set_state(saved)
    assert torch.equal(aug(images), out)
    assert Augment(crop_padding=0, flip=False)(images) is images
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)


@pytest.mark.parametrize(("padding", "flip"), [(2, True), (0, True), (3, False)])
def test_augment_matches_manual_crop_and_flip(padding: int, flip: bool) -> None:
    n, c, h, w = 32, 2, 5, 6
    images = torch.arange(n * c * h * w, dtype=torch.float32).view(n, c, h, w) + 1
    gen = torch.Generator().manual_seed(42)
    replay = torch.Generator()
    replay.set_state(gen.get_state())
    out = Augment(crop_padding=padding, flip=flip, generator=gen)(images)
    # Replay the documented draws: vertical offsets, horizontal offsets, then flip coins.
    if padding:
        dy = torch.randint(2 * padding + 1, (n,), generator=replay)
        dx = torch.randint(2 * padding + 1, (n,), generator=replay)
    else:
        dy = dx = torch.zeros(n, dtype=torch.int64)
    coins = torch.randint(2, (n,), generator=replay) if flip else torch.zeros(n, dtype=torch.int64)
    padded = F.pad(images, (padding,) * 4)
    for i in range(n):
        y, x = int(dy[i]), int(dx[i])
        want = padded[i, :, y : y + h, x : x + w]
        if coins[i]:
            want = want.flip(-1)
        assert torch.equal(out[i], want), i
    if padding:
        assert (out == 0).any()  # some crops reach into the zero padding
    if flip:
        assert 0 < int(coins.sum()) < n
