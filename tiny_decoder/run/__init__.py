"""Orchestration of one run: config checks (``config_checks``), building the data module, task and trainer
(``build``), resuming (``resume``), fitting, testing and recording the outcome (``fit``), and the files a run
leaves (``run_dir``). The command-line tools sit on top; tasks, training and the model below."""
