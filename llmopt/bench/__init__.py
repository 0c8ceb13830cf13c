"""`llmopt bench`: every speed and memory claim measured as a ratio, original vs optimized, in one run on one
machine, beside the physical bound it cannot beat.

One file per section (`kv_capacity`, `decode`, `serving`, `sparse_attention`, `calibration`); `sections` lists
them with the transform each needs, so a section whose transform is not installed is skipped with a line saying
so. `runner` runs them and `report` writes JSON, markdown and plots.
"""
