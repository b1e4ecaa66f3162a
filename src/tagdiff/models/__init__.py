"""Models: time predictors, classifiers, the ε-networks (an MLP; diffusers' UNet2DModel), the VAE and its latent
space, checkpoint files, and :func:`load`, the one loader of every checkpoint tagdiff accepts.

Importing this package imports every model class a checkpoint may name (they register themselves with
:mod:`.checkpoints`)."""

from .load import load as load
from .load import load_checkpoint as load_checkpoint
