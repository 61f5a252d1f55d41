"""Pure selection rules of the training-free image-token pruning baselines, batched over padded rows.

* :mod:`.divprune`: greedy max-min diversity on cosine distance (DivPrune, CVPR'25);
* :mod:`.cdpruner`: instruction-conditioned DPP, fast greedy MAP (CDPruner, NeurIPS'25);
* :mod:`.dart`: pivot-based duplication removal inside the LLM (DART, EMNLP'25);
* :mod:`.visionzip`: dominant top-k plus merged contextual tokens (VisionZip, CVPR'25);
* :mod:`.pdrop`: multi-stage FastV-style drop schedule at an equal token-layer budget (PyramidDrop, CVPR'25).
"""
