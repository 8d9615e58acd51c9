"""EigenGAN (He et al., ICCV 2021, arXiv 2104.12476) with orthogonality treatments of its bases."""
