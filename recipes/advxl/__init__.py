"""AdvXL: coarse-to-fine adversarial training at scale (Wang et al., CVPR 2024, arXiv 2401.04727)."""
