"""TAG inside the tools users already have: diffusers pipelines and schedulers (:mod:`.diffusers`)."""
