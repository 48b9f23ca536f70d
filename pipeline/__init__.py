"""segpipe: U-Net family segmentation of biomedical images on MONAI and PyTorch, run by DVC, tracked in MLflow.

The folders follow the data flow (tests/test_layers.py ranks them): data -> preprocessing ->
transforms -> networks -> inference -> training -> evaluation, with postprocessing and metrics
below. `pipeline.cli` maps each `segpipe` command to its entry in `pipeline.stages` (the DVC stages,
infer, export) or `pipeline.commands` (tools). See docs/index.md.
"""
