"""Global-batch load balancing (Qiu et al., Qwen, "Demons in the Detail", arXiv 2501.11873; Megatron-Core's
`global_aux_loss`): the Switch balance loss with the experts' selection frequencies counted over the whole global
batch instead of each micro-batch.

    L = E * sum_e f_e * P_e      f_e: share of top-k selections of expert e, over every micro-batch of this
                                      optimizer step so far and every data-parallel rank (no gradient);
                                 P_e: mean routing probability of e over this micro-batch's tokens (its gradient)

A micro-batch is small and often of one domain; asking each to be balanced forces every expert onto every
domain, which its authors find keeps experts from specialising. Over the global batch the balance can hold
while single micro-batches route unevenly. With one micro-batch on one rank it is transformers'
`load_balancing_loss_func` (the Mixtral/Qwen balance loss) exactly: f is then that micro-batch's own share.
Like Megatron-Core, the frequencies accumulate across the gradient-accumulation micro-batches of an optimizer
step (micro-batch m sees the counts of micro-batches 1..m, all ranks), and start over at the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class GlobalBatchBalance:
    """The global-batch balance loss of one model, over its MoE layers' router logits.

    >>> balance = GlobalBatchBalance(num_experts=8, top_k=2, reduce=all_reduce_sum)  # DDP: sums over ranks
    >>> for micro in micro_batches:                       # gradient accumulation
    ...     out = model(**micro)                          # output_router_logits=True
    ...     loss = out.loss + coef * balance.loss(out.router_logits)
    ...     loss.backward()
    >>> optimizer.step(); balance.end_step()
    """

    def __init__(self, num_experts: int, top_k: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.num_experts, self.top_k = num_experts, top_k
        self.reduce = reduce or (lambda t: t)  # sum over data-parallel ranks (in place or returned)
        self.counts_E: torch.Tensor | None = None  # top-k selections per expert, this step so far, all ranks
        self.rows = None  # routed (token, layer) rows behind those counts

    def loss(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """This micro-batch's loss from every MoE layer's router logits ([T, E] each, as the host model returns
        them with `output_router_logits=True`); adds the micro-batch's counts to the step's."""
        p_RE = torch.cat([x.float().softmax(dim=-1) for x in logits])  # rows of every layer, as transformers does
        with torch.no_grad():
            selected = torch.topk(p_RE, self.top_k, dim=-1).indices
            counts_E = torch.bincount(selected.reshape(-1), minlength=self.num_experts).float()
            rows = torch.tensor(float(p_RE.shape[0]), device=counts_E.device)
            both = self.reduce(torch.cat([counts_E, rows[None]]))  # one collective for the two
            counts_E, rows = both[:-1], both[-1]
            self.counts_E = counts_E if self.counts_E is None else self.counts_E + counts_E
            self.rows = rows if self.rows is None else self.rows + rows
            f_E = self.counts_E / self.rows
        return self.num_experts * (f_E * p_RE.mean(dim=0)).sum()

    def end_step(self) -> None:
        """The optimizer stepped: the next step's frequencies start over."""
        self.counts_E, self.rows = None, None
