"""The latent space (tagdiff.latent): encode/decode shapes and padding, the SD scaling factor, the latent cache, the
decoder adapter for image losses, and the model/VAE pairing checks."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from tagdiff.data import load_dataset
from tagdiff.guidance import DPSGuidance, label_loss
from tagdiff.models.checkpoints import CheckpointError
from tagdiff.models.classifiers import CleanClassifier
from tagdiff.models.latent import (
    LatentSpace,
    check_predictor_space,
    encode_dataset,
    posterior_means,
    sampling_space,
    scaling_factor,
    through_decoder,
    vae_hash,
)
from tagdiff.sampling.schedules import VPSchedule
from tagdiff.sampling.terms import StepContext


def tiny_vae(seed=0, size=8, latent_channels=4):
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=size).eval()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")[0][:96]


def test_encode_decode_shapes_and_the_scaling_factor_is_one_over_the_std_of_the_data_used(digits):
    vae = tiny_vae()
    means = posterior_means(vae, digits, batch_size=32)
    assert means.shape == (96, 4, 4, 4)
    s = scaling_factor(means)
    assert s == 1.0 / float(means.double().std()) and s != 1.0
    vae.register_to_config(scaling_factor=s)
    space = LatentSpace(vae)
    assert space.latent_shape == (4, 4, 4) and space.image_shape == (1, 8, 8) and space.scaling_factor == s
    with torch.no_grad():
        z = space.encode(digits)
        x = space.decode(z)
    assert z.shape == (96, 4, 4, 4) and x.shape == (96, 1, 8, 8)
    assert abs(float(z.double().std()) - 1.0) < 1e-5  # unit variance on the data the scale was computed on
    torch.testing.assert_close(z, means * s, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # decode divides by the scale again: equal up to the decoder's float32 rounding of an input
        # that differs in its last bit (measured ≤ 7e-7 across kernel sets; allowed 1e-4, as for any network pass)
        torch.testing.assert_close(x, vae.decode(means).sample, rtol=1e-4, atol=1e-4)


def test_images_are_padded_with_minus_one_and_cropped_back(digits):
    vae = tiny_vae(size=8)
    space = LatentSpace(vae, image_shape=(1, 6, 6), pad=(1, 1))
    x6 = digits[:4, :, 1:7, 1:7]
    with torch.no_grad():
        z = space.encode(x6)
        assert torch.equal(z, vae.encode(F.pad(x6, (1, 1, 1, 1), value=-1.0)).latent_dist.mean * space.scaling_factor)
        out = space.decode(z)
        assert torch.equal(out, vae.decode(z / space.scaling_factor).sample[..., 1:7, 1:7])
    assert out.shape == (4, 1, 6, 6)
    with pytest.raises(ValueError, match=r"images of shape \(4, 1, 8, 8\) do not fit .* expected \(B, 1, 6, 6\)"):
        space.encode(digits[:4])
    with pytest.raises(ValueError, match=r"latents of shape \(2, 4, 3, 3\) .* expected \(B, 4, 4, 4\)"):
        space.decode(torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match="do not fit this VAE"):
        LatentSpace(vae, image_shape=(1, 7, 7), pad=(1, 1))


def test_scaling_factor_refuses_constant_latents():
    with pytest.raises(ValueError, match="std 0"):
        scaling_factor(torch.ones(4, 2))


def test_the_latent_cache_is_reused_and_invalidated_when_the_vae_changes(tmp_path, digits, monkeypatch):
    vae_dir, cache = tmp_path / "vae", tmp_path / "cache"
    tiny_vae(0).save_pretrained(vae_dir)
    space = LatentSpace.from_pretrained(vae_dir)
    z1 = encode_dataset(space, digits, dataset="digits", split="train", cache_dir=cache, batch_size=32)
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith(f"digits-train-{space.hash[:16]}-")
    torch.testing.assert_close(z1, space.encode_batched(digits))

    again = LatentSpace.from_pretrained(vae_dir)  # a second run: the file is read, the encoder never runs
    calls = []
    monkeypatch.setattr(again, "encode_batched", lambda *a, **k: calls.append(1) or torch.zeros(1))
    z2 = encode_dataset(again, digits, dataset="digits", split="train", cache_dir=cache)
    assert calls == [] and torch.equal(z1, z2)
    z_sub = encode_dataset(again, digits[:10], dataset="digits", split="train", cache_dir=cache)  # other data
    assert calls == [1] and z_sub.shape == (1,)
    monkeypatch.undo()

    tiny_vae(1).save_pretrained(vae_dir)  # the VAE changes in place: another content hash, another entry
    changed = LatentSpace.from_pretrained(vae_dir)
    assert changed.hash == vae_hash(vae_dir) != space.hash
    z3 = encode_dataset(changed, digits, dataset="digits", split="train", cache_dir=cache)
    assert not torch.equal(z3, z1)
    torch.testing.assert_close(z3, changed.encode_batched(digits))
    assert len(list(cache.glob(f"digits-train-{changed.hash[:16]}-*"))) == 1

    corrupt = next(cache.glob(f"digits-train-{changed.hash[:16]}-*"))  # a corrupt file is recomputed
    corrupt.write_bytes(b"garbage")
    assert torch.equal(encode_dataset(changed, digits, dataset="digits", split="train", cache_dir=cache), z3)


def test_the_vae_hash_is_the_content_not_the_path(tmp_path):
    tiny_vae(0).save_pretrained(tmp_path / "a")
    tiny_vae(0).save_pretrained(tmp_path / "b")
    tiny_vae(2).save_pretrained(tmp_path / "c")
    assert vae_hash(tmp_path / "a") == vae_hash(tmp_path / "b") != vae_hash(tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_bytes((tmp_path / "a" / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is missing"):
        vae_hash(tmp_path / "d")
    with pytest.raises(CheckpointError, match="not an AutoencoderKL folder"):
        LatentSpace.from_pretrained(tmp_path)


def test_the_decoder_adapter_gradient_is_autograd_of_the_explicit_composition():
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.7)
    space = LatentSpace(vae)
    torch.manual_seed(3)
    clf = CleanClassifier(1, 8, 10, widths=(8,), hidden=16).eval()
    target = torch.tensor([3, 1, 4])
    z = torch.randn(3, 4, 4, 4, requires_grad=True)
    (g_adapter,) = torch.autograd.grad(through_decoder(label_loss(clf, target), space)(z).sum(), z)
    explicit = -torch.log_softmax(clf(vae.decode(z / 0.7).sample), -1).gather(1, target[:, None]).squeeze(1)
    (g_explicit,) = torch.autograd.grad(explicit.sum(), z)
    assert torch.equal(g_adapter, g_explicit) and g_adapter.abs().sum() > 0

    # DPS on latents: the term's Δs is -scale · that gradient through x̂_0(z_t) (here x̂_0 = z_t itself)
    ctx = StepContext(schedule=VPSchedule.linear(1000), eps_model=lambda x, t: x)
    zt = z.detach().requires_grad_()
    delta = DPSGuidance(space.image_loss(label_loss(clf, target)), 2.0).delta_score(zt, torch.full((3,), 5), zt, ctx)
    assert torch.equal(delta, -2.0 * g_explicit)


def test_sampling_space_and_predictor_checks_name_both_sides(tmp_path):
    from tagdiff.models.checkpoints import load_model

    tiny_vae(0).save_pretrained(tmp_path / "vae")
    assert sampling_space("digits", (1, 8, 8), None) is None  # a pixel model without a VAE
    with pytest.raises(ValueError, match=r"--vae .*vae makes latents of shape \(4, 4, 4\) but --checkpoint digits "
                                         r"samples shape \(1, 8, 8\)"):
        sampling_space("digits", (1, 8, 8), tmp_path / "vae")
    space = sampling_space("digits", (4, 4, 4), tmp_path / "vae")  # a foreign latent model (no record): allowed
    with pytest.raises(ValueError, match=r"time predictor digits/time_predictor works on x of shape \(1, 8, 8\) "
                                         r"but --checkpoint M samples latents"):
        check_predictor_space("digits/time_predictor", load_model("digits/time_predictor"), "M", space, "V")


def test_tfg_and_dps_run_on_latents_through_the_decoder():
    """Image losses drive latent sampling: TFG (a step term) and DPS (a score term) with a clean image classifier,
    on a latent ε-model, change the latents and stay finite."""
    from tagdiff import TFGGuidance, sample_ddim

    vae = tiny_vae()
    space = LatentSpace(vae)
    torch.manual_seed(4)
    clf = CleanClassifier(1, 8, 10, widths=(8,), hidden=16).eval()
    loss = space.image_loss(label_loss(clf, 3))
    schedule = VPSchedule.linear(1000)
    w = torch.randn(4, 4, 1, 1)

    def eps_model(x, t):  # a smooth stand-in for a latent UNet
        return torch.tanh(F.conv2d(x, w))

    z_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    grid = schedule.timesteps(3)
    plain = sample_ddim(eps_model, z_T, grid, schedule)
    for term in (TFGGuidance(loss, rho=1.0, mu=0.25, gamma=0.0), DPSGuidance(loss, 4.0)):
        out = sample_ddim(eps_model, z_T, grid, schedule, terms=[term])
        assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all() and not torch.equal(out, plain)
