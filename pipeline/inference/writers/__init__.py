"""Outputs written row band by row band, atomically: tiled BigTIFF (base.py, with the temp-file and
publish rules every writer shares), OME-TIFF (ome_tiff.py), OME-Zarr (ome_zarr.py), NIfTI (nifti.py),
their OME metadata (ome_meta.py), pyramids (pyramid.py) and chunk spools (spool.py); formats.py maps a
`--format` to its writer and file names."""
