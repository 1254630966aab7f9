"""Kept for imports written before the two chat-template processors became one:
``TemplateTrainingProcessor`` is :class:`mmsmall.inference.chat_template.ChatTemplateProcessor`."""

from mmsmall.inference.chat_template import ChatTemplateProcessor as TemplateTrainingProcessor

__all__ = ["TemplateTrainingProcessor"]
