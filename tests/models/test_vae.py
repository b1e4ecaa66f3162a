"""VAE training pieces (tagdiff.vae, recipes.make_vae): canvas padding, the latent shapes per dataset, the loss."""

import pytest
import torch

from tagdiff.cli.recipes import make_vae
from tagdiff.data import dataset_info
from tagdiff.models.vae import VAEModel, canvas_pad, reconstruction_metrics, vae_loss
from tagdiff.sampling.schedules import VPSchedule


@pytest.mark.parametrize("size, factor, pad", [(28, 4, (2, 2)), (8, 2, (0, 0)), (30, 4, (1, 1)), (27, 4, (2, 3)),
                                               (32, 8, (0, 0))])
def test_canvas_pad(size, factor, pad):
    assert canvas_pad(size, factor) == pad
    assert (size + sum(pad)) % (4 * factor) == 0


def test_mnist_vae_makes_8x8_latents_on_a_32x32_canvas_and_digits_4x4():
    torch.manual_seed(0)
    mnist = make_vae(dataset_info("mnist"))
    assert mnist.pad == (2, 2) and mnist.vae.config.sample_size == 32
    space = mnist.space()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        z = space.encode(x)
        assert z.shape == (2, 4, 8, 8) and space.decode(z).shape == (2, 1, 28, 28)
    digits = make_vae(dataset_info("digits"), widths=(8, 16))
    assert digits.pad == (0, 0) and digits.space().latent_shape == (4, 4, 4)
    with pytest.raises(ValueError, match="a VAE is for image datasets"):
        make_vae(dataset_info("toy"))
    with pytest.raises(ValueError, match=r"kl_weight \(β\) must be a finite number >= 0"):
        VAEModel(digits.vae, (1, 8, 8), (0, 0), kl_weight=-1.0)


def test_vae_loss_is_mse_plus_beta_kl_over_pixels_and_uses_the_batch_noise():
    torch.manual_seed(0)
    model = make_vae(dataset_info("digits"), widths=(8, 16), kl_weight=0.0)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 1, 8, 8, generator=g)
    sched = VPSchedule.linear(1000)
    t = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        base = vae_loss(model, x0, t, noise, sched)
        assert torch.equal(base, vae_loss(model, x0, t, noise, sched))  # deterministic given the noise
        assert not torch.equal(base, vae_loss(model, x0, t, torch.randn(4, 1, 8, 8, generator=g), sched))
        post = model.vae.encode(x0).latent_dist
        eps = noise.reshape(4, -1)[:, :64].reshape(4, 4, 4, 4)
        mse = (model.vae.decode(post.mean + post.std * eps).sample - x0).pow(2).mean()
        torch.testing.assert_close(base, mse, rtol=1e-6, atol=1e-7)
        model.kl_weight = 1e-3
        torch.testing.assert_close(vae_loss(model, x0, t, noise, sched) - base, 1e-3 * post.kl().mean() / 64,
                                   rtol=1e-4, atol=1e-8)


def test_reconstruction_metrics_psnr_is_of_the_mean_squared_error():
    torch.manual_seed(0)
    space = make_vae(dataset_info("digits"), widths=(8, 16)).space()
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    m = reconstruction_metrics(space, x)
    rec = space.decode_batched(space.encode_batched(x)).clamp(-1, 1)
    assert m["mse"] == pytest.approx(float((rec.double() - x.double()).pow(2).mean()), rel=1e-12)
    assert m["psnr_db"] == pytest.approx(10 * torch.log10(torch.tensor(4.0 / m["mse"])).item(), rel=1e-6)
    assert m["num_samples"] == 8
