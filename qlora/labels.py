"""The label of a position no loss is taken on: PyTorch's cross_entropy ignore_index.

Data writes it into label masks (prompts, padding); the loss skips it. Defined here, below both,
because the loop must run on any batch without importing the data package.
"""

IGNORE_INDEX = -100
