"""The embedded model's tools: task data, tokenizer building, training and evaluation. Replicas never import these.

Rebuild the shipped checkpoint, then measure accuracy against the step cap:

    python -m model.training.train --out runs/embedded --seed 1 --compile
    python -m model.training.evaluate --model runs/embedded
"""
