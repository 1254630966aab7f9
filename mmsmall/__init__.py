"""mmsmall: an open, Molmo-style multimodal small-model pipeline.

Importing mmsmall imports no torch or transformers (``mmsmall --help`` and curation workers stay
fast). Our Hugging Face classes (model_type ``mmsmall``) register with transformers' Auto classes
when :mod:`mmsmall.export.hf` is imported, which every loader of our format does; a user loading a
release with the Auto classes imports it first::

    import mmsmall.export.hf  # registers model_type "mmsmall"
    model = AutoModelForImageTextToText.from_pretrained(path)
"""

__version__ = "0.1.0"
