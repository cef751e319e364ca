"""The bottom layer: the project's error types, the name -> factory registry and the config-check helper.

Everything else may import it; it imports nothing of the project."""
