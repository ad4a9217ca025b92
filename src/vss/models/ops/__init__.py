"""Numerical building blocks shared by the models, each equal to the plain PyTorch formulation it replaces."""
