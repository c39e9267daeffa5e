"""Experiments on the demo task; ``ablation`` compares every objective of METHOD.md §6."""
