"""Inference: the Predictor (batched, left-padded generation that eval, chat and live eval use) and chat/predict."""
