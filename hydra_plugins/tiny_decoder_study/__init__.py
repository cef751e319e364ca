"""tiny_decoder's Hydra sweeper for studies (``hydra/sweeper=study``; ``tiny_decoder/run/study.py`` holds the logic).
Hydra finds it because it lives in the ``hydra_plugins`` namespace package."""
