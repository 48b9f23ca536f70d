"""Images in: tiled TIFF/BigTIFF/OME-TIFF, NIfTI, SimpleITK formats and arrays read band by band
(images.py, with the TIFF structure checks of tiff_checks.py), and the checkpoint's recorded training
preprocessing applied on the fly (preprocessed.py)."""
