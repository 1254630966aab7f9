"""mmsmall: an open, Molmo-style multimodal small-model pipeline.

Importing mmsmall registers its Hugging Face classes (model_type ``mmsmall``) with transformers'
Auto classes, so ``AutoModelForImageTextToText.from_pretrained(release)`` works after it.
"""

__version__ = "0.1.0"

from mmsmall.model import hf as _hf  # noqa: E402,F401  (registers with the Auto classes)
