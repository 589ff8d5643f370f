"""Private torch APIs: each one in megalith.core._torch_compat still works on this torch, and none is used elsewhere.

The scan reads the source of every distribution (python/ and packages/*/src) and lists what it reaches through a
private name of torch: a `_name` attribute of anything imported from torch, an import of a private torch module or
name, or a private tensor/module attribute (PRIVATE_ATTRIBUTES) on any object. Only _torch_compat.py may do so.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from megalith.core._torch_compat import is_view, version_counter
from megalith.core.pipeline.schedules import _release

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "python", *sorted((ROOT / "packages").glob("*/src"))]
COMPAT = ROOT / "packages/core/src/megalith/core/_torch_compat.py"
# Private attributes of tensors and modules, found whatever the object is called.
PRIVATE_ATTRIBUTES = {"_base", "_buffers", "_execution_engine", "_local_tensor", "_modules", "_parameters", "_version"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def _chain(node: ast.Attribute) -> tuple[ast.expr, list[str]]:
    """The object an attribute chain starts from and the attribute names, outermost last (`a.b.c` -> a, [b, c])."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return node, names[::-1]


def private_torch_uses(source: str) -> set[str]:
    """The private torch names `source` (Python code) imports or reaches, as dotted paths."""
    tree = ast.parse(source)
    torch_names: set[str] = set()  # local names bound to torch or to something imported from it
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    torch_names.add(alias.asname or "torch")
                    if any(_private(part) for part in alias.name.split(".")):
                        found.add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for alias in node.names:
                torch_names.add(alias.asname or alias.name)
                if any(_private(part) for part in [*node.module.split("."), alias.name]):
                    found.add(f"{node.module}.{alias.name}")
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue  # each chain is read once, from its outermost attribute
        root, names = _chain(node)
        if isinstance(root, ast.Name) and root.id in torch_names and any(_private(n) for n in names):
            found.add(".".join([root.id, *names]))
        elif not (isinstance(root, ast.Name) and root.id in ("self", "cls")):
            found.update(f"<object>.{n}" for n in names if n in PRIVATE_ATTRIBUTES)
    return found


def test_the_scan_finds_each_kind_of_private_use():
    source = (
        "import torch\nimport torch.distributed as dist\nfrom torch.distributed._tensor import DTensor\n"
        "from torch.optim.adamw import adamw\nfrom torch.distributed.checkpoint.filesystem import _StorageInfo\n"
        "torch.autograd.Variable._execution_engine.run_backward()\ndist._functional_collectives\n"
        "torch._fused_adamw_([])\nx._base\nmodule._parameters.items()\nself._base\ntorch.autograd.backward(x)\n"
    )
    assert private_torch_uses(source) == {
        "torch.distributed._tensor.DTensor",
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "torch.autograd.Variable._execution_engine.run_backward",
        "dist._functional_collectives",
        "torch._fused_adamw_",
        "<object>._base",
        "<object>._parameters",
    }


def test_private_torch_apis_are_used_only_in_torch_compat():
    found = set()
    for folder in SOURCES:
        for path in sorted(folder.rglob("*.py")):
            if path != COMPAT:
                found |= {(str(path.relative_to(ROOT)), use) for use in private_torch_uses(path.read_text())}
    assert not found, f"private torch APIs outside megalith/core/_torch_compat.py (move them there): {sorted(found)}"
    want = {"<object>._base", "<object>._version", "torch._grouped_mm", "torch._scaled_mm"}
    assert private_torch_uses(COMPAT.read_text()) == want, "update this test with _torch_compat.py"


def test_is_view_tells_views_from_tensors_that_own_their_memory():
    assert hasattr(torch.Tensor, "_base"), "torch.Tensor._base is gone: _torch_compat.is_view needs another way"
    x = torch.randn(4, 6, requires_grad=True)
    y = x * 2
    assert not is_view(x) and not is_view(y) and not is_view(y.clone())
    assert is_view(y.t()) and is_view(y[1:]) and is_view(y.view(24))


def test_version_counter_grows_with_each_in_place_change_only():
    gone = "torch.Tensor._version is gone: _torch_compat.version_counter needs another way"
    assert hasattr(torch.Tensor, "_version"), gone
    x = torch.arange(6)
    start = version_counter(x)
    y = x + 1  # out of place: x unchanged
    assert version_counter(x) == start
    x.add_(1)
    x[0] = 5
    assert version_counter(x) == start + 2 and version_counter(y) == 0
    assert version_counter(x[1:]) == version_counter(x), "a view shares its base's counter"


def test_a_released_output_frees_its_memory_and_backward_still_gives_the_same_gradients():
    x = torch.randn(4, 6, requires_grad=True)
    grad = torch.randn(4, 6)
    # tanh's backward reads tanh's own output: autograd must keep it although the output's memory is released.
    for f in (lambda t: torch.tanh(t * 3) + t, lambda t: torch.tanh(t * 3)):
        f(x).backward(grad)
        want, x.grad = x.grad, None
        out = f(x)
        _release(out)
        assert out.shape == (4, 6) and out.untyped_storage().nbytes() == out.element_size()
        torch.autograd.backward(out, grad)
        torch.testing.assert_close(x.grad, want, rtol=0, atol=0)
        x.grad = None
    view = (x * 3).t()
    _release(view)
    assert view.untyped_storage().nbytes() == 24 * view.element_size(), "a view's memory belongs to its base"
