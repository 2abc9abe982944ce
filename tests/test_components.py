"""Component-level edits (issue 13, item 1) against a dense reference: ΔW after each edit equals the
intended ΔW computed densely, the rank and layout are kept, and PEFT loads every edited adapter."""

from __future__ import annotations

import pytest
import torch

from safeprune.adapter import load_adapter
from safeprune.edit import (
    component_energy,
    component_svd,
    gate_components,
    orthogonalise,
    project_out,
    remove_components,
)
from safeprune.errors import UsageError

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ad(llama_adapter):
    return load_adapter(llama_adapter)


def _dense_svd(m):
    return torch.linalg.svd(m.delta_weight(torch.float64), full_matrices=False)


def test_orthogonalise_keeps_delta_w_and_exposes_singular_directions(ad):
    ortho = orthogonalise(ad)
    for name, m in ad.modules.items():
        o = ortho.modules[name]
        assert o.lora_A.shape == m.lora_A.shape and o.lora_B.shape == m.lora_B.shape and o.r == m.r
        torch.testing.assert_close(o.delta_weight(), m.delta_weight(), **TOL)
        U, S, Vh = _dense_svd(m)
        r = m.r
        # component i of the rewritten module is σ_i u_i v_iᵀ (up to a joint sign)
        for i in range(r):
            comp = o.scaling * torch.outer(o.lora_B[:, i].double(), o.lora_A[i].double())
            torch.testing.assert_close(comp, S[i] * torch.outer(U[:, i], Vh[i]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(component_energy(m), S[:r] ** 2, rtol=1e-6, atol=1e-9)
        u, s, v = component_svd(m)
        torch.testing.assert_close(u @ torch.diag(s) @ v.T, m.delta_weight(), **TOL)


def test_remove_components_equals_the_dense_truncation(ad):
    ortho = orthogonalise(ad)
    name = next(iter(ad.modules))
    edited = remove_components(ortho, {name: [0, 2]})
    m = ad.modules[name]
    U, S, Vh = _dense_svd(m)
    keep = [i for i in range(m.r) if i not in (0, 2)]
    want = U[:, keep] @ torch.diag(S[keep]) @ Vh[keep]
    torch.testing.assert_close(edited.modules[name].delta_weight(), want, **TOL)
    assert edited.modules[name].r == m.r  # same rank: vLLM serves one global r
    other = next(n for n in ad.modules if n != name)
    assert torch.equal(edited.modules[other].lora_B, ortho.modules[other].lora_B)


def test_gates_scale_each_component(ad):
    ortho = orthogonalise(ad)
    name = list(ad.modules)[1]
    g = torch.tensor([1.0, 0.5, 0.0, 0.25])
    edited = gate_components(ortho, {name: g})
    m = ad.modules[name]
    U, S, Vh = _dense_svd(m)
    want = U[:, : m.r] @ torch.diag(S[: m.r] * g.double()) @ Vh[: m.r]
    torch.testing.assert_close(edited.modules[name].delta_weight(), want, **TOL)


def test_project_out_removes_the_output_along_a_direction(ad):
    name = next(n for n in ad.modules if n.endswith("o_proj"))
    m = ad.modules[name]
    d = torch.randn(m.out_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    edited = project_out(ad, {name: d})
    r = d / d.norm()
    P = torch.eye(m.out_features, dtype=torch.float64) - torch.outer(r, r)
    torch.testing.assert_close(edited.modules[name].delta_weight(), P @ m.delta_weight(), **TOL)
    assert float((r @ edited.modules[name].delta_weight()).abs().max()) < 1e-6
    # two directions at once: the output loses its part in their span
    D = torch.randn(m.out_features, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Q, _ = torch.linalg.qr(D)
    edited2 = project_out(ad, {name: D})
    want = (torch.eye(m.out_features, dtype=torch.float64) - Q @ Q.T) @ m.delta_weight()
    torch.testing.assert_close(edited2.modules[name].delta_weight(), want, **TOL)


def test_every_component_edit_loads_in_peft(ad, llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name = next(iter(ad.modules))
    o_name = next(n for n in ad.modules if n.endswith("o_proj"))
    m = ad.modules[o_name]
    edits = {
        "ortho": orthogonalise(ad),
        "removed": remove_components(orthogonalise(ad), {name: [1]}),
        "gated": gate_components(orthogonalise(ad), {name: [0.5] * ad.modules[name].r}),
        "projected": project_out(ad, {o_name: torch.ones(m.out_features)}),
    }
    for label, edited in edits.items():
        out = edited.save(tmp_path / label)
        base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
        pm = PeftModel.from_pretrained(base, str(out))
        ids = torch.tensor([[1, 2, 3, 4]])
        assert torch.isfinite(pm(input_ids=ids).logits).all(), label
        assert load_adapter(out).modules[name].r == ad.modules[name].r


def test_bad_edits_are_refused(ad):
    name = next(iter(ad.modules))
    r = ad.modules[name].r
    with pytest.raises(UsageError, match="not LoRA modules"):
        remove_components(ad, {"nope": [0]})
    with pytest.raises(UsageError, match="components 0"):
        remove_components(ad, {name: [r]})
    with pytest.raises(UsageError, match=r"must lie in \[0, 1\]"):
        gate_components(ad, {name: [1.5] * r})
    with pytest.raises(UsageError, match="gates"):
        gate_components(ad, {name: [1.0]})
    with pytest.raises(UsageError, match="non-zero"):
        project_out(ad, {name: torch.zeros(ad.modules[name].out_features)})
    with pytest.raises(UsageError, match="entries"):
        project_out(ad, {name: torch.ones(3)})


def test_orthogonalise_with_a_negative_alpha(ad):
    from dataclasses import replace

    name = next(iter(ad.modules))
    m = ad.modules[name]
    neg = ad.with_modules({**ad.modules, name: replace(m, alpha=-m.alpha, scaling=-m.scaling)})
    o = orthogonalise(neg).modules[name]
    torch.testing.assert_close(o.delta_weight(), neg.modules[name].delta_weight(), **TOL)
