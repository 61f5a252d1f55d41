"""Dynamic-LLaVA sparsification: predictors, gated attention, decisions and the budget loss."""
