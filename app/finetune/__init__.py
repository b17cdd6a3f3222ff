"""Offline fine-tuning: text in, a checkpoint that `textgen serve --model DIR` loads.

The server never imports this package; it runs as `textgen finetune` or `python -m app.finetune`.
"""
