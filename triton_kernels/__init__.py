"""Triton kernels, installed as ``llmopt.triton_kernels``: one folder per op, each with a checked public
function (``kernel.py``) and a plain torch reference of the same signature (``naive.py``). They import only
torch and triton."""
