"""One inference run: `predict_file` / `infer_files` (predict.py) read an image, stream it through the
engine and write its outputs, resumable after a kill (resume.py), sharded over torchrun processes
(shards.py), over the files of the input globs (inputs.py)."""
