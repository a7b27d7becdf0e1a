"""complex_as_real: the captured graph with complex tensors carried as real pairs computes what the
original computes, has no complex tensor left, and refuses an op it does not know by name.

The models are small modules written the way diffusers' rotary code is (Qwen-Image's
``view_as_complex(x) * freqs``, Z-Image's ``torch.polar`` tables indexed by position ids, Lumina's
reshapes), exported with torch.export as capture.py does."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from rfc_compile.export import ExportError
from rfc_compile.export.complex_as_real import complex_as_real


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


class QwenStyle(torch.nn.Module):
    """A complex table as a buffer, sliced, reshaped, expanded and concatenated per axis."""

    def __init__(self):
        super().__init__()
        angles = torch.outer(torch.arange(16.0), 1.0 / 100 ** (torch.arange(0, 6, 2) / 6))
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:  # q: (B, tokens=8, heads=2, 6)
        rows = torch.cat([self.freqs[:4], self.freqs[-4:]], dim=0)  # (8, 3)
        table = rows.view(8, 1, 3).expand(-1, 2, -1)  # per head
        return _rotate(q, table.unsqueeze(0)) + _rotate(q, rows.unsqueeze(-2))


class ZImageStyle(torch.nn.Module):
    """Tables built in the graph with torch.polar, gathered by position ids, split per axis."""

    def forward(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # q: (B, 8, 2, 8)
        base = torch.arange(32.0).unsqueeze(1) * torch.tensor([1.0, 0.1, 0.01, 0.001])
        table = torch.polar(torch.ones_like(base), base)  # (32, 4) complex
        freqs = table[positions]  # (8, 4)
        a, b = freqs.split([1, 3], dim=-1)
        freqs = torch.cat([b, a], dim=-1).transpose(0, -1).transpose(-1, 0)  # a negative dim, twice
        return _rotate(q, freqs.unsqueeze(1).to(torch.complex64))


class MixedStyle(torch.nn.Module):
    """Complex times a real tensor and a scalar, a sum of complex values, permutes, select, stack."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # x: (B, 3, 4, 2)
        z = torch.view_as_complex(x.contiguous())  # (B, 3, 4)
        w = (z * scale.unsqueeze(-1)) * 0.5 + z  # scale: (B, 3), real
        w = torch.stack([w.permute(0, 2, 1), w.transpose(-1, -2)], dim=-1).select(-1, 0)
        return torch.view_as_real(w * torch.complex(torch.ones(4, 3), torch.full((4, 3), 0.25)))


def _lowered(model: torch.nn.Module, *args: torch.Tensor) -> tuple[fx.GraphModule, int]:
    gm = torch.export.export(model, args).module()
    return gm, complex_as_real(gm)


def _complex_values(gm: fx.GraphModule) -> tuple[list[str], fx.Interpreter]:
    """Nodes that give a complex tensor (get_attr included) as an interpreter run finds them."""
    found: list[str] = []
    probe = fx.Interpreter(gm)
    original = probe.run_node

    def run_node(node):
        out = original(node)
        if isinstance(out, torch.Tensor) and out.is_complex():
            found.append(node.format_node())
        return out

    probe.run_node = run_node
    return found, probe


@pytest.mark.parametrize("model, args", [
    (QwenStyle(), (torch.randn(2, 8, 2, 6),)),
    (ZImageStyle(), (torch.randn(2, 8, 2, 8), torch.tensor([0, 3, 5, 7, 9, 30, 31, 2]))),
    (MixedStyle(), (torch.randn(2, 3, 4, 2), torch.randn(2, 3))),
], ids=["qwen_style", "zimage_style", "mixed"])
def test_the_real_pair_graph_computes_what_the_complex_one_did(model, args):
    expected = model(*args)
    gm, changed = _lowered(model, *args)
    assert changed > 0
    found, probe = _complex_values(gm)
    got = probe.run(*args)
    assert found == []  # no node reads or makes a complex tensor (the old table is left unused)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_graph_without_complex_values_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    gm = torch.export.export(model, (torch.randn(2, 4),)).module()
    before = gm.code
    assert complex_as_real(gm) == 0
    assert gm.code == before


class _ComplexAbs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(x).abs()


class _ComplexPlusReal(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(torch.view_as_complex(x) + y)


@pytest.mark.parametrize("model, args, op", [
    (_ComplexAbs(), (torch.randn(3, 2),), "abs"),
    (_ComplexPlusReal(), (torch.randn(3, 2), torch.randn(3)), "add"),  # a real addend would broadcast wrong
])
def test_a_complex_op_it_does_not_know_is_refused_by_name(model, args, op):
    gm = torch.export.export(model, args).module()
    with pytest.raises(ExportError, match=rf"complex-valued aten\.{op}\.\w+ .*complex_as_real"):
        complex_as_real(gm)
