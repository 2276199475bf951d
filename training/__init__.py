"""Headless TDM distillation: ``python -m training.distill --help``."""
