"""Evaluation: language-modelling scores comparable with published numbers."""
