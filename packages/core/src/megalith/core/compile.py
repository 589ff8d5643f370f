"""Regional compilation, applied from outside the model: each transformer block runs through `torch.compile`.

`apply_compile(model)` compiles every block of a Transformer (or of one pipeline stage of it) in place, with
`nn.Module.compile`, so parameter names, placements and checkpoints are unchanged. It is the last runtime step of
`megalith.core.build` (after tensor/sequence parallelism, the op set, dropout and recomputation) and comes before
the weights are materialised and data parallelism wraps the chunk, as torchtitan orders it:

- the blocks are compiled, not the whole model: every block has the same structure, and dynamo guards on a
  module's structure rather than its identity, so one graph serves all of them and compile time does not grow
  with depth. Embedding, final norm and output projection stay eager (one matmul each, nothing to fuse);
- `fullgraph=True`: a graph break inside a block is an error at the first step instead of a silent slowdown. The
  tensor/sequence-parallel collectives (autograd Functions around `torch.distributed` calls) and Megalith's fused
  ops (torch operators with fake implementations) are traced into the graph;
- recomputation stays inside the compiled region: `torch.compile` traces `torch.utils.checkpoint` and replays the
  recomputed part in the backward graph;
- dropout must be off: compiled dropout draws its masks from torch.compile's own random stream, not from the
  model's RNG tracker streams, so masks would neither match tensor-parallel ranks' expectations nor replay under
  recomputation. `apply_compile` refuses a model with dropout.
"""

from __future__ import annotations

from torch import nn

from megalith.core.models.transformer import AttentionCore, Dropout

__all__ = ["apply_compile"]


def _dropout_in_use(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that would draw dropout masks while training."""
    found = []
    for name, module in model.named_modules():
        if (isinstance(module, Dropout) and module.p > 0) or (
            isinstance(module, AttentionCore) and module.dropout_p > 0
        ):
            found.append(name)
    return found


def apply_compile(model: nn.Module, *, fullgraph: bool = True) -> nn.Module:
    """Compiles each transformer block of `model` (a Transformer or a pipeline stage of one) in place.

    Compilation itself happens at the first forward of each block; this only marks the blocks. Call it after
    `apply_tensor_parallel`, `apply_kernels`, `apply_dropout` and `apply_recompute`.

    Args:
        model: the model or stage; its `layers` are compiled.
        fullgraph: refuse graph breaks inside a block (the default); False lets dynamo split a block into
            several graphs around code it cannot trace.

    Returns:
        The model.

    Raises:
        ValueError: dropout is enabled somewhere in the model.
    """
    dropout = _dropout_in_use(model)
    if dropout:
        shown = ", ".join(dropout[:4]) + (f" and {len(dropout) - 4} more" if len(dropout) > 4 else "")
        raise ValueError(
            f"compiled blocks need dropout off, but {shown} draw dropout masks; set runtime.hidden_dropout and "
            "runtime.attention_dropout to 0 or runtime.compile to false"
        )
    for layer in model.layers.values():
        layer.compile(fullgraph=fullgraph)
    return model
