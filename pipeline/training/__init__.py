"""The `train` stage: patch training of a registry network on a prepared dataset.

`settings` resolves a profile of configs/train.yaml into `TrainSettings`; `loader` draws the
patches; `losses` holds U-Net eq. 1, soft Dice and deep supervision; `loop` trains; `stage` is the
entry of `segpipe train` (the only module that reads configs/).
"""
