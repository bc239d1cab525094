"""Layer 4, transforms: new models made from an analysed one (permute/unpermute, perturb, watermark) and the permutation key."""
