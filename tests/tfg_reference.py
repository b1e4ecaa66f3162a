"""Transcriptions of the TFG benchmark (``YWolfeee/Training-Free-Guidance``) that several tests compare against.

Kept apart from ``tagdiff``'s own code on purpose: these are the ground truth, written from the benchmark's source.
"""

from __future__ import annotations


def space_timesteps(num_timesteps: int, section_count: int) -> list[int]:
    """The benchmark's grid, ``diffusion/unet/openai.py::space_timesteps`` with one section, decreasing (Python's
    ``round``, i.e. round-half-to-even)."""
    frac_stride = 1 if section_count <= 1 else (num_timesteps - 1) / (section_count - 1)
    cur, steps = 0.0, []
    for _ in range(section_count):
        steps.append(round(cur))
        cur += frac_stride
    return sorted(set(steps), reverse=True)
