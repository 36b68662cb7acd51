"""Fast AdvProp, with vanilla and AdvProp baselines at the same budget (Mei et al., ICLR 2022, arXiv 2204.09838)."""
