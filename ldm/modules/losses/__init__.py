from ldm.modules.losses.reconstruction import KLReconstructionLoss  # noqa: F401
