"""Reading runs and models: attention maps (extraction and plots, for the tools and the callbacks) and the
statistics of seed-replicated comparisons (``arms``: the report's intervals, paired differences and verdicts)."""
