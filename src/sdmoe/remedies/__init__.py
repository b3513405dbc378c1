"""The other remedies for experts that fail to specialise, beside SD-MoE: Guo et al.'s orthogonality and
variance losses (`specialisation`) and global-batch load balancing (`balance`). Each is a loss term a
training loop adds to its language-model loss, in `sdmoe train`, the compare, or a user's own loop."""
