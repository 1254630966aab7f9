"""mmsmall: an open, Molmo-style multimodal small-model pipeline."""

__version__ = "0.1.0"
