"""The expert projections every layout holds, in their canonical order; torch-free, so the
torch-free config modules (`sdmoe.method.config`) can name them without loading a model."""

# gate and up: E x F x D (rows = ffn units); down: stored E x D x F, read hidden-last as E x F x D.
PROJECTIONS = ("gate", "up", "down")
