"""The ``tagdiff`` command line (an application of the library; ``pip install tagdiff[cli]``). Name → class tables
live here only."""

from .main import main as main
