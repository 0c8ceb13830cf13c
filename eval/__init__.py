"""llmopt.eval: what an optimization costs, as retention against the original model, offline.

`llmopt.eval.suite.run_suite` scores models in process (perplexity on held-out text, passkey retrieval, lm-eval
multiple-choice tasks built from packaged data) and `llmopt.eval.report.Report` writes markdown, JSON and plots.
Submodules import lazily: ``import llmopt.eval`` loads neither lm-eval nor matplotlib.
"""
