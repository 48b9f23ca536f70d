"""The streaming engine: the window plan (tiling.py), sliding-window blending and the row stream
(sliding_window.py: `predict`, `stream_probabilities`), test-time augmentation (tta.py), memory checks
(memory.py) and probabilities -> label map (labels.py). It runs any `InferenceNetwork`; no file is written."""
