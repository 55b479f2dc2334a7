"""``gcsam.toolkit.models``: the registry contract, shapes and finite gradients at every data
set's input shape, parameter counts of published references, deterministic construction,
argument validation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from gcsam.toolkit.models import (
    IMAGENET_STEM_MIN_SIZE,
    MODELS,
    ModelSpec,
    build_model,
    default_patch_size,
    describe_model,
    register_model,
)
from gcsam.toolkit.models.cnn import small_cnn
from gcsam.toolkit.models.resnet import BasicBlock, ResNet

# Small settings of the built-in models so every test stays fast on 2 CPU cores; a model
# registered without an entry here is tested at its defaults.
SMALL: dict[str, dict] = {
    "small-cnn": {},
    "convnet": {},
    "resnet18": {"width": 0.25},
    "resnet20": {"width": 0.5},
    "resnet50": {"width": 0.125},
    "vgg16": {"width": 0.125},
    "wrn": {"depth": 10, "widen_factor": 1},
    "vit": {"depth": 2, "width": 0.25},
}
# (channels, image size): digits, MNIST/Fashion-MNIST/MedMNIST, CIFAR, 64 px image folders; the
# 8 and 32 px shapes cover every model in the fast run.
SHAPES = [
    (1, 8),
    pytest.param(1, 28, marks=pytest.mark.slow, id="1x28"),
    (3, 32),
    pytest.param(3, 64, marks=pytest.mark.slow, id="3x64"),
]


def small(name: str, num_classes: int, channels: int, size: int, **kwargs) -> nn.Module:
    return build_model(name, num_classes, channels, size, **{**SMALL.get(name, {}), **kwargs})


def check_train_step(model: nn.Module, channels: int, size: int, num_classes: int) -> None:
    """One SGD step on a batch of 2 (BatchNorm needs > 1 value per channel on 1x1 maps) in
    training mode: the logits have shape ``(2, num_classes)``, the loss is finite, every parameter
    gets a finite gradient and the step changes the weights but keeps them finite."""
    torch.manual_seed(0)
    model.train()
    x = torch.randn(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    loss = F.cross_entropy(out, torch.tensor([0, num_classes - 1]))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    # A hand-written SGD step: the first torch.optim optimizer imports torch._dynamo (~3 s).
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.fixture
def scratch_registry() -> Iterator[None]:
    """Restores :data:`MODELS` after a test that registers models."""
    saved = dict(MODELS)
    try:
        yield
    finally:
        MODELS.clear()
        MODELS.update(saved)


# --------------------------------------------------------------------------- registry


def test_models_registry() -> None:
    assert tuple(MODELS) == (
        "small-cnn",
        "convnet",
        "resnet18",
        "resnet20",
        "resnet50",
        "vgg16",
        "wrn",
        "vit",
    )
    assert set(SMALL) <= set(MODELS)
    for name, spec in MODELS.items():
        assert isinstance(spec, ModelSpec)
        assert spec.name == name
        assert spec.summary.strip() and "\n" not in spec.summary
    options = {name: spec.options for name, spec in MODELS.items() if spec.options}
    assert options == {
        "resnet20": ("depth",),
        "wrn": ("depth", "widen_factor"),
        "vit": ("depth", "patch_size"),
    }


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("smallcnn", "small-cnn"),
        ("cnn", "small-cnn"),
        ("Small_CNN", "small-cnn"),
        ("wideresnet", "wrn"),
        ("Wide_ResNet", "wrn"),
        ("vgg", "vgg16"),
        (" VGG16 ", "vgg16"),
    ],
)
def test_aliases(alias: str, name: str) -> None:
    def state(key: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        return build_model(key, 10, 3, 8, width=0.125).state_dict()

    a, b = state(alias), state(name)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("scratch_registry")
@pytest.mark.parametrize(
    ("name", "aliases", "match"),
    [
        ("small-cnn", (), "'small-cnn' is already registered"),
        ("cnn", (), "'cnn' is already registered"),  # an existing alias as a name
        ("new-net", ("vgg16",), "'vgg16' is already registered"),  # an existing name as alias
        ("new-net", ("wide-resnet",), "'wide-resnet' is already registered"),
        ("new-net", ("nn", "nn"), "'nn' is already registered"),
        ("New_Net", (), "lowercase"),
    ],
)
def test_register_duplicate_or_bad_name_raises(
    name: str, aliases: tuple[str, ...], match: str
) -> None:
    before = dict(MODELS)
    with pytest.raises(ValueError, match=match):
        register_model(name, summary="x", aliases=aliases)
    assert before == MODELS


@pytest.mark.usefixtures("scratch_registry")
def test_register_bad_option_or_summary_raises() -> None:
    with pytest.raises(ValueError, match="unknown model option 'heads'"):
        register_model("new-net", summary="x", options=("heads",))
    with pytest.raises(ValueError, match="one non-empty line"):
        register_model("new-net", summary="two\nlines")
    assert "new-net" not in MODELS


@pytest.mark.usefixtures("scratch_registry")
def test_register_recipe() -> None:
    """The docstring recipe: decorate a builder, then build it by name or alias."""
    calls: list[dict] = []

    @register_model("tiny-mlp", summary="a test MLP", options=("depth",), aliases=("mlp",))
    def tiny_mlp(
        num_classes: int,
        in_channels: int,
        image_size: int,
        *,
        width: float,
        dropout: float,
        depth: int | None = None,
    ) -> nn.Module:
        calls.append({"width": width, "dropout": dropout, "depth": depth})
        hidden = round(8 * width)
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size**2, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    assert tuple(MODELS)[-1] == "tiny-mlp"
    assert MODELS["tiny-mlp"].builder is tiny_mlp
    check_train_step(build_model("Tiny_MLP", 3, 1, 8, width=2), 1, 8, 3)
    check_train_step(build_model("mlp", 3, 1, 8, depth=3, dropout=0.5), 1, 8, 3)
    assert calls == [
        {"width": 2, "dropout": 0.0, "depth": None},
        {"width": 1.0, "dropout": 0.5, "depth": 3},
    ]
    with pytest.raises(ValueError, match=r"valid names: .*, vit, tiny-mlp$"):
        build_model("nope", 3, 1, 8)


@pytest.mark.usefixtures("scratch_registry")
def test_option_owners_come_from_registry() -> None:
    """ "<option> applies only to ..." lists the registered models taking it, in MODELS order."""
    register_model("deep-net", summary="x", options=("depth", "widen_factor"))(small_cnn)
    with pytest.raises(ValueError, match="depth applies only to resnet20, wrn, vit, deep-net, not"):
        build_model("vgg16", 3, 1, 8, depth=3)
    with pytest.raises(ValueError, match=r"widen_factor applies only to wrn, deep-net, not vit$"):
        build_model("vit", 3, 1, 8, widen_factor=2)
    with pytest.raises(ValueError, match=r"patch_size applies only to vit, not deep-net$"):
        build_model("deep-net", 3, 1, 8, patch_size=2)


# --------------------------------------------------------------------------- shapes, training


@pytest.mark.parametrize(("channels", "size"), SHAPES, ids=["1x8", "1x28", "3x32", "3x64"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    check_train_step(small(name, 7, channels, size), channels, size, 7)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_stem_at_128(name: str) -> None:
    torch.manual_seed(0)
    model = small(name, 3, 3, IMAGENET_STEM_MIN_SIZE)
    assert model.imagenet_stem
    assert model.stem[0].kernel_size == (7, 7)
    assert isinstance(model.stem[-1], nn.MaxPool2d)
    check_train_step(model, 3, 128, 3)
    cifar = small(name, 3, 3, IMAGENET_STEM_MIN_SIZE - 1)
    assert not cifar.imagenet_stem
    assert cifar.stem[0].kernel_size == (3, 3)


@pytest.mark.parametrize("name", MODELS)
def test_smallest_image(name: str) -> None:
    check_train_step(small(name, 2, 1, 4), 1, 4, 2)


@pytest.mark.parametrize("name", MODELS)
def test_eval_batch_of_one(name: str) -> None:
    torch.manual_seed(0)
    model = small(name, 4, 3, 32, dropout=0.3)
    check_train_step(model, 3, 32, 4)  # moves the BatchNorm running statistics
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        again = model(x)
    assert out.shape == (1, 4)
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)  # no dropout, running statistics in eval mode


@pytest.mark.parametrize("name", ["small-cnn", "resnet18", "vgg16", "wrn", "vit"])
def test_dropout_active_in_training_only(name: str) -> None:
    torch.manual_seed(0)
    model = small(name, 4, 3, 8, dropout=0.5)
    x = torch.randn(4, 3, 8, 8)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# --------------------------------------------------------------------------- parameter counts


def test_resnet18_count() -> None:
    # CIFAR ResNet-18 (3x3 stem), e.g. kuangliu/pytorch-cifar: 11,173,962 parameters, 62 tensors.
    assert describe_model(build_model("resnet18", 10, 3, 32)) == {
        "parameters": 11_173_962,
        "tensors": 62,
    }
    # ImageNet stem at 224 px with 1000 classes: torchvision's resnet18, 11,689,512.
    assert describe_model(build_model("resnet18", 1000, 3, 224))["parameters"] == 11_689_512


def test_resnet18_width_quarter() -> None:
    model = build_model("resnet18", 10, 3, 32, width=0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 16
    assert model.head[-1].in_features == 128  # 512 * 0.25


@pytest.mark.parametrize(
    ("depth", "count"),
    # He et al., Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M (option-A shortcuts, no parameters).
    [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962)],
)
def test_resnet20_family_counts(depth: int, count: int) -> None:
    kwargs = {} if depth == 20 else {"depth": depth}
    assert describe_model(build_model("resnet20", 10, 3, 32, **kwargs))["parameters"] == count


def test_resnet20_projection_shortcut_count() -> None:
    # The often-quoted 272,474 is ResNet-20 with 1x1-conv + BN ("option B") shortcuts at the two
    # stage transitions: 16*32 + 2*32 + 32*64 + 2*64 = 2,752 more than option A.
    model = ResNet(BasicBlock, (3, 3, 3), (16, 32, 64), 10, 3, stem_channels=16)
    assert describe_model(model)["parameters"] == 272_474 == 269_722 + 2_752


def test_wrn_16_8_count() -> None:
    # Zagoruyko & Komodakis's WRN-16-8 on CIFAR-10 (~11.0M): 10,961,370.
    assert describe_model(build_model("wrn", 10, 3, 32))["parameters"] == 10_961_370
    # WRN-28-10: 36,479,194 (the paper's 36.5M).
    model = build_model("wrn", 10, 3, 32, depth=28, widen_factor=10)
    assert describe_model(model)["parameters"] == 36_479_194


def test_resnet50_counts() -> None:
    # CIFAR stem, 10 classes: 23,520,842; ImageNet stem, 1000 classes: torchvision's 25,557,032.
    assert describe_model(build_model("resnet50", 10, 3, 32)) == {
        "parameters": 23_520_842,
        "tensors": 161,
    }
    assert describe_model(build_model("resnet50", 1000, 3, 224))["parameters"] == 25_557_032


def test_vgg16_count() -> None:
    # 13 bias-free 3x3 convs (config D) 14,710,464 + their BN 8,448 + hidden 512*512 + 512 + head
    # 512*10 + 10. (kuangliu's CIFAR VGG16, 14,728,266, adds conv biases and has no hidden layer.)
    model = build_model("vgg16", 10, 3, 32)
    expected = 14_710_464 + 8_448 + 262_656 + 5_130
    assert describe_model(model)["parameters"] == expected == 14_986_698
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13


@pytest.mark.parametrize(("size", "pools"), [(4, 2), (8, 3), (28, 4), (32, 5), (64, 5)])
def test_vgg16_skips_pools_below_one_pixel(size: int, pools: int) -> None:
    model = build_model("vgg16", 10, 1, size, width=0.125)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == pools


def test_small_cnn_count() -> None:
    def conv_bn(cin: int, cout: int) -> int:
        return 9 * cin * cout + 2 * cout

    expected = conv_bn(3, 16) + conv_bn(16, 16) + conv_bn(16, 32) + conv_bn(32, 32) + 32 * 10 + 10
    assert describe_model(build_model("small-cnn", 10, 3, 32)) == {
        "parameters": expected,
        "tensors": 14,
    }
    assert expected == 17_082
    wide = describe_model(build_model("small-cnn", 10, 3, 32, width=2))["parameters"]
    assert wide == conv_bn(3, 32) + conv_bn(32, 32) + conv_bn(32, 64) + conv_bn(64, 64) + 650


@pytest.mark.parametrize(("width", "dim"), [(1.0, 192), (0.5, 96), (0.25, 48), (0.01, 3)])
def test_vit_count(width: float, dim: int) -> None:
    depth, size, channels, classes = 3, 32, 3, 10
    model = build_model("vit", classes, channels, size, width=width, depth=depth)
    patch = 8
    tokens = (size // patch) ** 2 + 1
    block = 12 * dim * dim + 13 * dim  # 2 LayerNorms, qkv, proj, MLP with ratio 4
    expected = (
        (channels * patch * patch + 1) * dim  # patch embedding
        + dim  # class token
        + tokens * dim  # position embedding (patches + class token)
        + depth * block
        + 2 * dim  # final LayerNorm
        + dim * classes
        + classes
    )
    assert describe_model(model)["parameters"] == expected
    assert model.head.in_features == dim


@pytest.mark.parametrize(
    ("size", "patch"), [(4, 1), (8, 2), (28, 7), (30, 6), (32, 8), (64, 16), (224, 56)]
)
def test_vit_default_patch_size(size: int, patch: int) -> None:
    assert default_patch_size(size) == patch
    model = build_model("vit", 10, 3, size, depth=1, width=0.05)
    assert model.patch_size == patch
    assert model.num_patches == (size // patch) ** 2


def test_vit_explicit_patch_size_and_wrong_input() -> None:
    model = build_model("vit", 10, 1, 28, patch_size=4, depth=1, width=0.1)
    assert model.num_patches == 49
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="28x28"):
        model(torch.randn(2, 1, 32, 32))


def test_describe_model() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    assert describe_model(model) == {"parameters": 3 * 4 + 4 + 4 * 2, "tensors": 3}
    tied = nn.Sequential(model[0], model[0])  # shared parameters count once
    assert describe_model(tied) == {"parameters": 16, "tensors": 2}
    assert describe_model(nn.ReLU()) == {"parameters": 0, "tensors": 0}


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_construction(name: str) -> None:
    def state(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return small(name, 10, 3, 32).state_dict()

    a, b, c = state(0), state(0), state(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_conv_init_is_kaiming_fan_out() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 32)
    conv = model.stages[3][0].conv2  # 512 -> 512, 3x3: fan_out = 4,608
    expected = (2 / (512 * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.02


def test_name_normalization() -> None:
    assert isinstance(build_model("ResNet18", 10, 3, 32, width=0.0625), ResNet)
    assert describe_model(build_model("small_cnn", 10, 3, 32))["parameters"] == 17_082


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("resnet", 10, 3, 32), {}, r"unknown model name 'resnet'; valid names: small-cnn, "),
        ((None, 10, 3, 32), {}, "name must be a string"),
        (("resnet18", 1, 3, 32), {}, "num_classes"),
        (("resnet18", 2.5, 3, 32), {}, "num_classes"),
        (("resnet18", 10, 0, 32), {}, "in_channels"),
        (("resnet18", 10, 3, 3), {}, "image_size"),
        (("resnet18", 10, 3, True), {}, "image_size"),
        (("resnet18", 10, 3, 32), {"width": 0}, "width"),
        (("resnet18", 10, 3, 32), {"width": -0.5}, "width"),
        (("resnet18", 10, 3, 32), {"width": float("nan")}, "width"),
        (("resnet18", 10, 3, 32), {"width": float("inf")}, "width"),
        (("resnet18", 10, 3, 32), {"dropout": 1.0}, "dropout"),
        (("resnet18", 10, 3, 32), {"dropout": -0.1}, "dropout"),
        (("resnet20", 10, 3, 32), {"depth": 21}, r"depth .* 6n \+ 2"),
        (("resnet20", 10, 3, 32), {"depth": 2}, r"depth .* 6n \+ 2"),
        (("wrn", 10, 3, 32), {"depth": 20}, r"depth .* 6n \+ 4"),
        (("wrn", 10, 3, 32), {"depth": 4}, r"depth .* 6n \+ 4"),
        (("wrn", 10, 3, 32), {"widen_factor": 0}, "widen_factor"),
        (("vit", 10, 3, 32), {"depth": 0}, "depth"),
        (("vit", 10, 3, 32), {"patch_size": 5}, "patch_size 5 must divide image_size 32"),
        (("vit", 10, 3, 32), {"patch_size": 0}, "patch_size"),
        (("resnet18", 10, 3, 32), {"depth": 20}, "depth applies only to resnet20, wrn, vit"),
        (("vgg16", 10, 3, 32), {"widen_factor": 2}, "widen_factor applies only to wrn"),
        (("wrn", 10, 3, 32), {"patch_size": 4}, "patch_size applies only to vit"),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(*args, **kwargs)
