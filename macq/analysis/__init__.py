"""Research analyses behind ``macq analyze`` and ``macq bench`` (evaluator layer).

* :mod:`.stats` — weight statistics per layer (moments, outliers, generalized-Gaussian fit, histogram KL)
  and the correlation statistics (Pearson, Spearman, with p-values).
* :mod:`.bounds` — rate-distortion yardsticks at a layer's effective rate: the Gaussian Shannon bound, the
  Shannon lower bound of the fitted GGD (entropy power), and the Lloyd-Max optimum for the fitted GGD.
* :mod:`.functional` — weight error vs output error: layer output MSE on calibration activations, and the
  logits MSE / KL / cross-entropy change of quantizing one linear alone.
* :mod:`.sensitivity` — one decoder layer, or one kind of linear, alone quantized.
* :mod:`.report` — the versioned JSON, the Markdown report and the PNG plots.

Nothing here quantizes or loads a model: callers pass the float model and the quantizations to compare.
"""
