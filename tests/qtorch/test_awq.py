"""qtorch.awq: activation-aware scales folded into a block leave the float model's function unchanged, rescale the
Hessians to those of the new inputs, and are undone where the fold would change the block."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import qtorch
import qtorch.awq as awq
from qcore import PerGroup, QuantScheme
from qcore.gptq import Hessian
from tests.qtorch.test_calibrate import bert_model, llama_model, state_bytes, token_batches

SCHEME = QuantScheme(4, False, PerGroup(32, axis=1))


def loud_llama():
    """A tiny Llama whose first hidden channels are large and whose norms are not all ones: scaling pays."""
    m = llama_model()
    with torch.no_grad():
        m.model.embed_tokens.weight[:, :4] *= 20
        g = torch.Generator().manual_seed(1)
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 1.5 + 0.5)
    return m


def jobs_and_hessians(model, block, batch):
    """Stand-ins for quantize_model's jobs (every Linear of ``block``) and their Hessians over ``batch``."""
    names = [n for n, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)]
    jobs = [SimpleNamespace(module=block.get_submodule(n), record=SimpleNamespace(name=n),
                            target=SimpleNamespace(scheme=SCHEME)) for n in names]
    accs = [Hessian(job.module.in_features) for job in jobs]
    handles = [job.module.register_forward_pre_hook(lambda _m, a, acc=acc: acc.add(a[0].double().numpy()))
               for job, acc in zip(jobs, accs)]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    return jobs, accs


def test_folding_leaves_a_float_llama_unchanged_and_rescales_the_hessians():
    m, batch = loud_llama(), token_batches()[0]
    block = m.model.layers[0]
    with torch.no_grad():
        ref = m(**batch).logits
    jobs, accs = jobs_and_hessians(m, block, batch)
    folded = awq.fold_block(block, jobs, accs, lambda: m(**batch).logits)
    # both norms took scales, and down_proj took its own, folded into the rows of up_proj (gate_proj would not do)
    assert [name for name, _ in folded] == ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert all(0 < alpha <= 1 for _, alpha in folded)
    with torch.no_grad():
        out = m(**batch).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    _, again = jobs_and_hessians(m, block, batch)  # the Hessians of the inputs the layers now see
    for a, b in zip(accs, again):
        np.testing.assert_allclose(a.h, b.h, rtol=1e-4, atol=1e-6 * np.abs(b.h).max())
    assert not np.allclose(accs[0].h, jobs_and_hessians(loud_llama(), loud_llama().model.layers[0], batch)[1][0].h)


@pytest.mark.parametrize("spread", [2.0, 1.001])
def test_a_fold_that_changes_the_block_is_undone(monkeypatch, spread):
    """BERT's LayerNorm output also feeds the residual: scaling it changes the block, so nothing is kept. Nor
    does key take scales folded into query's rows (query runs before it, beside it, with outputs of key's input
    width), however little they change this small model's output (spread 1.001)."""
    m, batch = bert_model(), token_batches()[0]
    block = m.encoder.layer[1]
    jobs, accs = jobs_and_hessians(m, block, batch)
    before, hs = state_bytes(m), [a.h.copy() for a in accs]
    rng = np.random.default_rng(0)
    monkeypatch.setattr(awq, "awq_scales", lambda ws, h, scheme, grid: (
        rng.uniform(1 / spread, spread, h.shape[0]).astype(np.float32), 0.5))
    assert awq.fold_block(block, jobs, accs, lambda: m(**batch).last_hidden_state) == []
    assert state_bytes(m) == before
    assert all(np.array_equal(a.h, h) for a, h in zip(accs, hs))


def test_gptq_with_awq_folds_scales_and_gives_identical_bytes():
    batches = token_batches(n=4)
    states = []
    for use in (False, True, True):
        m = loud_llama()
        qtorch.quantize_model(m, "w4a16-g32", method="gptq", calibration=batches, method_options={"awq": use})
        states.append(state_bytes(m))
        norm = m.model.layers[0].input_layernorm.weight
        assert torch.equal(norm, loud_llama().model.layers[0].input_layernorm.weight) != use  # folded: 1 / s
    assert states[1] == states[2] != states[0]


def test_by_default_awq_folds_at_4_bits_and_not_at_8():
    # at 8 bits the folds cost SmolLM2 perplexity (-0.0% -> +0.1% over dense): the default keeps them to 4 bits
    for scheme, folded in (("w4a16-g32", True), ("w8a16", False)):
        m = loud_llama()
        qtorch.quantize_model(m, scheme, method="gptq", calibration=token_batches(n=4))
        norm = m.model.layers[0].input_layernorm.weight
        assert torch.equal(norm, loud_llama().model.layers[0].input_layernorm.weight) != folded, scheme


def test_awq_option_is_checked():
    with pytest.raises(TypeError, match="method_options awq must be a bool"):
        qtorch.quantize_model(llama_model(), "w4a16-g32", method="gptq", calibration=token_batches(),
                              method_options={"awq": "yes"})
