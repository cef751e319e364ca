"""Looking inside a model: attention maps (extraction and plots), used by the tools and the callbacks."""
