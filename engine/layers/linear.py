"""Linear layers whose weight stacks several Hugging Face projections along the output dim."""

from torch import nn


class MergedLinear(nn.Linear):
    """One matmul for several projections of the same input (q/k/v, gate/up).

    `output_sizes[i]` rows of the weight, in order, belong to shard i; the loader copies each
    checkpoint tensor into its shard's rows.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)

    def shard_rows(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])
