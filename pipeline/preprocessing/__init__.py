"""The `prepare` stage: raw archives -> validated, split NIfTI cases with U-Net eq. 2 weight maps."""
