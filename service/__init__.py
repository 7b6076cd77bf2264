"""bnlab: train and serve neural networks with and without batch normalization."""

__version__ = "0.1.0"
