"""The committed checkpoints (``checkpoints/mnist``, ``checkpoints/mnist_latent``, docs/RESULTS.md §4) and the shipped
digits/toy assets: each folder loads as the model its name says, holds only what the 10 MB rule allows, records the
command its README gives, and computes on the machine at hand the held-out figures recorded beside it
(``heldout.json``, written by ``checkpoints/heldout.py``) within the tolerances stated there."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from tagdiff.models.checkpoints import load_model, read_config
from tagdiff.models.classifiers import CleanClassifier, EvalClassifier, NoisyClassifier
from tagdiff.models.load import load_checkpoint

ROOT = Path(__file__).resolve().parents[2] / "checkpoints" / "mnist"
CLASSIFIERS = {"clf_noisy": NoisyClassifier, "clf_clean": CleanClassifier, "clf_eval": EvalClassifier}

pytestmark = pytest.mark.skipif(not (ROOT / "unet").is_dir(), reason="checkpoints/mnist is not in this checkout")


def _assert_committable(folder: Path) -> None:
    assert not (folder / "train_state.safetensors").exists()  # resume state stays in runs/, never committed
    for f in folder.iterdir():
        assert f.stat().st_size <= 10 * 2**20, f


def _recorded_command(folder: Path) -> str:
    meta = folder / "tagdiff.json"
    return (json.loads(meta.read_text()) if meta.exists() else read_config(folder))["command"]


def test_committed_mnist_models_load_for_mnist_images():
    eps_model, schedule = load_checkpoint(ROOT / "unet")
    assert tuple(eps_model.sample_shape) == (1, 28, 28)
    assert schedule.num_train_timesteps == 1000
    with torch.no_grad():
        eps = eps_model(torch.zeros(2, 1, 28, 28), torch.tensor([0, 999]))
    assert eps.shape == (2, 1, 28, 28) and torch.isfinite(eps).all()
    models = {name: load_model(ROOT / name) for name in CLASSIFIERS}
    for name, cls in CLASSIFIERS.items():
        assert type(models[name]) is cls, name
        assert tuple(models[name].sample_shape) == (1, 28, 28), name
    assert models["clf_noisy"].num_train_timesteps == schedule.num_train_timesteps


def test_committed_mnist_class_conditional_unet_is_conditional_with_a_null_class():
    from tagdiff.models.unet import load_unet

    model, schedule = load_unet(ROOT / "unet_class")
    assert model.null_class == 10 and tuple(model.sample_shape) == (1, 28, 28)
    assert schedule.num_train_timesteps == 1000
    x, t = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.full((4,), 500)
    with torch.no_grad():
        eps = {y: model(x, t, y=torch.full((4,), y)) for y in (3, 7, 10)}
    # the label reaches the network (dropout trained the null class too): three labels, three different ε
    assert not torch.allclose(eps[3], eps[7]) and not torch.allclose(eps[3], eps[10])


@pytest.mark.parametrize("name", ["unet", "unet_class", "time_predictor", *CLASSIFIERS])
def test_committed_mnist_checkpoint_matches_its_readme_and_size_rule(name):
    folder = ROOT / name
    command = _recorded_command(folder)
    assert f"--out runs/mnist/{name} " in f"{command} " or f"--out checkpoints/mnist/{name} " in f"{command} "
    table = (ROOT / "README.md").read_text()
    assert f"`{command.removesuffix(' --quiet')}`" in table.replace("$D", "../shared/data/mnist"), command
    _assert_committable(folder)


LATENT = ROOT.parent / "mnist_latent"


@pytest.mark.skipif(not (LATENT / "vae").is_dir(), reason="checkpoints/mnist_latent is not in this checkout")
def test_committed_latent_mnist_models_pair_with_their_vae_and_readme():
    from tagdiff.models.latent import LatentSpace, check_pairing
    from tagdiff.models.unet import load_unet

    space = LatentSpace.from_pretrained(LATENT / "vae")
    x = torch.zeros(2, 1, 28, 28).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = space.encode(x)
        assert z.shape == (2, 4, 8, 8) and space.decode(z).shape == (2, 1, 28, 28)
    unet_dir, tp_dir = LATENT / "ckpt" / "unet_class", LATENT / "ckpt" / "time_predictor"
    model, _ = load_unet(unet_dir)
    assert model.null_class == 10 and tuple(model.sample_shape) == (4, 8, 8)
    predictor = load_model(tp_dir)
    assert tuple(predictor.sample_shape) == (4, 8, 8)
    for folder in (unet_dir, tp_dir):   # both were trained on this VAE (content hash), wherever it is copied
        assert check_pairing(LATENT / "vae", space, folder, "--checkpoint")["hash"] == space.hash
    table = (LATENT / "README.md").read_text().replace("$D", "../shared/data/mnist")
    for folder in (LATENT / "vae", unet_dir, tp_dir):
        assert f"`{_recorded_command(folder).removesuffix(' --quiet')}`" in table, folder
        assert not (folder / "latent_cache").exists()
        _assert_committable(folder)


FLOW = ROOT.parent / "mnist_flow"


@pytest.mark.skipif(not (FLOW / "unet").is_dir(), reason="checkpoints/mnist_flow is not in this checkout")
def test_committed_mnist_flow_models_match_their_readme_and_pair():
    """The MNIST flow UNet (class-conditional, null label 10) and its σ predictor: the commands of their README, the
    size rule, and the predictor's bins on the flow's VP view (what TAG and the CLI check)."""
    from tagdiff.guidance.temporal import check_predictor_schedule
    from tagdiff.models.flow_checkpoint import load_flow

    flow = load_flow(FLOW / "unet")
    assert flow.null_class == 10 and tuple(flow.sample_shape) == (1, 28, 28) and flow.sigma_density == "logit_normal"
    predictor = load_model(FLOW / "time_predictor")
    check_predictor_schedule(predictor, flow.schedule.vp_schedule)
    table = (FLOW / "README.md").read_text()
    for folder in (FLOW / "unet", FLOW / "time_predictor"):
        assert f"`{_recorded_command(folder).removesuffix(' --quiet')}`" in table, folder
        _assert_committable(folder)


STRONG = ROOT.parent / "mnist_strong"


@pytest.mark.skipif(not (STRONG / "unet").is_dir(), reason="checkpoints/mnist_strong is not in this checkout")
def test_committed_strong_mnist_unet_matches_its_readme_and_completes_a_models_dir():
    """The stronger MNIST ε-model (docs/RESULTS.md §4c): its README's command, the size rule, the VP schedule of the
    other MNIST models, and the folder is a whole ``--models-dir`` (the predictor and classifiers are links to
    ``checkpoints/mnist``'s, trained on data, not on the UNet)."""
    eps_model, schedule = load_checkpoint(STRONG / "unet")
    _, old_schedule = load_checkpoint(ROOT / "unet")
    assert tuple(eps_model.sample_shape) == (1, 28, 28)
    assert torch.equal(schedule.alpha_bar, old_schedule.alpha_bar)
    command = _recorded_command(STRONG / "unet")
    assert "--out runs/mnist_strong/unet " in f"{command} "
    table = (STRONG / "README.md").read_text().replace("$D", "../shared/data/mnist")
    assert f"`{command.removesuffix(' --quiet')}`" in table
    _assert_committable(STRONG / "unet")
    for name in ("time_predictor", *CLASSIFIERS):
        assert (STRONG / name).resolve() == (ROOT / name).resolve(), name


# ------------------------------------------------------------------------------ recorded held-out figures
_spec = importlib.util.spec_from_file_location("heldout", ROOT.parent / "heldout.py")
heldout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(heldout)
MNIST_DIR = Path(os.environ.get("TAGDIFF_MNIST_DIR", heldout.DEFAULT_MNIST))
HAVE_MNIST = (MNIST_DIR / "t10k-images-idx3-ubyte").exists() or (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()


@pytest.mark.parametrize("name", list(heldout.all_folders()))
def test_committed_model_computes_its_recorded_figures_here(name):
    """The probe always (no data needed); the held-out figures where their data is here (MNIST: ``$TAGDIFF_MNIST_DIR``
    or ``../shared/data/mnist``). Tolerances and their derivation: ``heldout.TOLERANCES``."""
    kind = heldout.all_folders()[name]
    recorded = json.loads((heldout.folder_path(name) / "heldout.json").read_text())
    assert recorded["kind"] == kind
    now = heldout.figures(name, kind, MNIST_DIR if HAVE_MNIST else None)
    assert heldout.compare(recorded, now) == []
    if name.startswith("mnist") and not HAVE_MNIST:
        pytest.skip(f"probe checked; MNIST held-out figures need the IDX files in {MNIST_DIR}")
    assert recorded["held_out"] is not None and now["held_out"] is not None


def test_the_comparison_catches_a_changed_model():
    """The tolerances are tight enough to see a changed model: a probe moved by 0.1 % (100× the tolerance, far less than
    any retraining moves it) and a held-out accuracy moved by 4 flips are both refused."""
    unet = json.loads((heldout.folder_path("digits/unet") / "heldout.json").read_text())
    other = dict(unet, probe={k: v * (1 + 1e-3) for k, v in unet["probe"].items()})
    assert any(line.startswith("probe") for line in heldout.compare(unet, other))
    clf = json.loads((heldout.folder_path("digits/clf_eval") / "heldout.json").read_text())
    moved = dict(clf, held_out=dict(clf["held_out"], accuracy=clf["held_out"]["accuracy"] + 4 / 359))
    assert heldout.compare(clf, moved) == ["held_out accuracy: "
                                           f"{moved['held_out']['accuracy']!r} against recorded "
                                           f"{clf['held_out']['accuracy']!r}"]
