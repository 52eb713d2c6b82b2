"""Attention heads: pruned by norm, removed exactly, through shrink and the pipeline."""

from __future__ import annotations

import dataclasses
import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from litcompress import CompressionConfig, PruneConfig, compress, make_permanent_, shrink
from litcompress.models import GatedTransformerClassifier, TransformerClassifier
from litcompress.pipeline import preview_shrink
from litcompress.pruning.engine import deepcopy_model
from litcompress.pruning.heads import (HeadPrunedAttention, attention_head_norms, prune_heads_, remove_zero_heads_,
                                       rewrite_attentions_, zero_heads)
from litcompress.quantization import load_quantized


class Holder(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def _zero_values_(attention: nn.MultiheadAttention, heads: list[int]) -> None:
    embed, width = attention.embed_dim, attention.head_dim
    with torch.no_grad():
        for head in heads:
            rows = slice(2 * embed + head * width, 2 * embed + (head + 1) * width)
            attention.in_proj_weight[rows] = 0
            if attention.in_proj_bias is not None:
                attention.in_proj_bias[rows] = 0


@settings(max_examples=60, deadline=None)
@given(heads=st.sampled_from([1, 2, 3, 4, 6]), head_dim=st.sampled_from([2, 4, 5]), bias=st.booleans(),
       batch_first=st.booleans(), zero=st.data(), mask=st.sampled_from([None, "float", "bool", "per-head"]),
       padding=st.booleans(), unbatched=st.booleans(), need_weights=st.booleans(), seed=st.integers(0, 2**16))
def test_removing_heads_whose_values_are_zero_keeps_every_output(heads, head_dim, bias, batch_first, zero, mask,
                                                                 padding, unbatched, need_weights, seed):
    torch.manual_seed(seed)
    embed = heads * head_dim
    holder = Holder(nn.MultiheadAttention(embed, heads, bias=bias, batch_first=batch_first)).eval()
    dead = sorted(zero.draw(st.sets(st.integers(0, heads - 1))))
    _zero_values_(holder.attention, dead)
    attention = holder.attention
    batch, length = 3, 5
    shape = (length, embed) if unbatched else (batch, length, embed) if batch_first else (length, batch, embed)
    x = torch.randn(shape)
    attn_mask = {None: None, "float": torch.randn(length, length), "bool": torch.rand(length, length) > 0.6,
                 "per-head": torch.randn((1 if unbatched else batch) * heads, length, length)}[mask]
    if mask == "bool":
        attn_mask[:, 0] = False  # every query may attend somewhere
    key_padding_mask = None
    if padding:
        key_padding_mask = torch.zeros((length,) if unbatched else (batch, length), dtype=torch.bool)
        key_padding_mask[..., -1] = True
    kwargs = dict(key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=need_weights)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "mismatched key_padding_mask and attn_mask" types
        expected, expected_weights = attention(x, x, x, **kwargs)
        before = sum(p.numel() for p in holder.parameters())
        removed, kept = remove_zero_heads_(holder)
        replaced = holder.attention
        got, weights = replaced(x, x, x, **kwargs)
    assert kept == []
    survivors = heads - len(dead) or 1  # no head left: one stays, adding nothing
    if survivors == heads:  # (a single head, zero: nothing to remove)
        assert removed == [] and replaced is attention
    else:
        assert isinstance(replaced, HeadPrunedAttention) and replaced.num_heads == survivors
        assert [(h.heads_before, h.heads_after) for h in removed] == [(heads, survivors)]
        per_head = 4 * embed * head_dim + (3 * head_dim if bias else 0)  # q, k, v rows and biases, out_proj columns
        assert sum(p.numel() for p in holder.parameters()) == before - (heads - survivors) * per_head
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if need_weights:
        assert weights.shape == expected_weights.shape  # averaged over the kept heads only (documented)


def test_prune_heads_masks_the_weakest_heads_of_each_attention_and_keeps_what_it_masked():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "a": nn.MultiheadAttention(32, 8), "b": nn.MultiheadAttention(24, 3, bias=False),
        "excluded": nn.MultiheadAttention(16, 4), "cross": nn.MultiheadAttention(16, 4, kdim=8, vdim=8)})
    with torch.no_grad():
        for head, scale in enumerate([1.0, 0.1, 2.0, 0.2, 3.0, 0.3, 4.0, 0.4]):  # a's weakest: 1, 3, 5, 7 in order
            model["a"].in_proj_weight.view(3, 8, 4, 32)[:, head] *= scale
    norms = attention_head_norms(model["a"])
    assert norms.argsort()[:4].tolist() == [1, 3, 5, 7]
    assert prune_heads_(model, 0.25, exclude=("excluded",)) == {"a": 2, "b": 1}  # round(0.75) = 1 of 3
    assert zero_heads(model["a"]).nonzero().flatten().tolist() == [1, 3]
    assert not zero_heads(model["excluded"]).any()
    assert prune_heads_(model, 0.5, exclude=("excluded",)) == {"a": 4, "b": 2}
    assert zero_heads(model["a"]).nonzero().flatten().tolist() == [1, 3, 5, 7]
    # the query and key rows of a pruned head are zero too, and training cannot bring them back
    assert (model["a"].in_proj_weight.view(3, 8, 4, 32)[:, [1, 3, 5, 7]] == 0).all()
    assert prune_heads_(model, 0.25, exclude=("excluded",)) == {"a": 4, "b": 2}  # a smaller fraction unmasks none
    assert zero_heads(model["a"]).nonzero().flatten().tolist() == [1, 3, 5, 7]
    assert prune_heads_(model, 0.99) == {"a": 7, "b": 2, "excluded": 3}  # one head always stays
    dead = nn.MultiheadAttention(16, 4)  # every head zero already (a review: all four were masked)
    with torch.no_grad():
        dead.in_proj_weight.zero_()
        dead.in_proj_bias.zero_()
    assert prune_heads_(nn.ModuleDict({"dead": dead}), 0.5) == {"dead": 3}
    with pytest.raises(ValueError, match=r"prune_heads_\(fraction=1.0\).*\[0, 1\)"):
        prune_heads_(model, 1.0)


def test_a_later_round_ranks_heads_by_their_weights_as_they_are_now():
    """Between rounds an optimizer changes ``in_proj_weight_orig``; ``in_proj_weight`` keeps the values of the last
    forward until the next one. The next round ranks the heads by the trained values."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4)
    x = torch.randn(3, 2, 16)
    prune_heads_(attention, 0.25)
    first = zero_heads(attention).nonzero().flatten().tolist()
    attention(x, x, x)  # the pruning hook caches orig * mask
    with torch.no_grad():  # "training" makes the weakest surviving head the strongest one, and the others weak
        view = attention.in_proj_weight_orig.view(3, 4, 4, 16)
        survivors = [h for h in range(4) if h not in first]
        weakest = min(survivors, key=lambda h: float(view[:, h].norm()))
        for head in survivors:
            view[:, head] *= 100.0 if head == weakest else 0.01
    assert attention_head_norms(attention)[weakest] == attention_head_norms(attention)[survivors].max()
    prune_heads_(attention, 0.5)
    pruned = zero_heads(attention).nonzero().flatten().tolist()
    assert len(pruned) == 2 and set(first) < set(pruned) and weakest not in pruned


class _SelfAttentionThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x)[0])


@pytest.mark.parametrize("rewrite", [remove_zero_heads_, rewrite_attentions_], ids=["remove", "rewrite"])
def test_heads_removed_after_an_optimizer_step_compute_with_the_trained_weights(rewrite):
    """An optimizer step after the last forward leaves the masked attention's ``in_proj_weight`` and
    ``out_proj.weight`` one step old; the replacement is built from ``orig * mask``, what the next forward uses."""
    torch.manual_seed(0)
    model = _SelfAttentionThenLinear()
    x = torch.randn(2, 5, 16)
    prune_heads_(model, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = deepcopy_model(model)(x)  # a forward of the masked model computes with orig * mask
        rewrite(model)
        got = model(x)
    assert isinstance(model.attention, HeadPrunedAttention)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_transformer_encoder_on_its_fast_paths_computes_the_same_without_its_pruned_heads():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    assert encoder.use_nested_tensor  # padded batches take the nested-tensor path, reading the attention's weights
    x = torch.randn(3, 7, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, -2:] = True
    prune_heads_(encoder, 0.5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, expected_padded = encoder(x), encoder(x, src_key_padding_mask=padding)
        make_permanent_(encoder)
        removed, _ = remove_zero_heads_(encoder)
        got, got_padded = encoder(x), encoder(x, src_key_padding_mask=padding)
    assert [h.heads_after for h in removed] == [2, 2]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_padded[~padding], expected_padded[~padding], rtol=1e-5, atol=1e-5)
    encoder.train()  # and it trains: gradients reach the kept heads
    encoder(x).sum().backward()
    assert encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("model_class", [TransformerClassifier, GatedTransformerClassifier])
def test_the_pipeline_prunes_heads_along_its_schedule_and_shrink_removes_them(model_class, tmp_path):
    torch.manual_seed(0)
    model = model_class(heads=4)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    optimizer_steps = 12

    def fine_tune(net, step):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        for t in range(1, optimizer_steps + 1):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            step(t)

    config = CompressionConfig(prune=PruneConfig(sparsity=0.5, method="ln_structured", heads=0.5, rounds=4),
                               fp32_format="onnx", latency_repeats=2)
    result = compress(model, config, eval_fn=lambda m: 1.0, example_inputs=x[:8], fine_tune=fine_tune,
                      fine_tune_steps=optimizer_steps, output_dir=tmp_path)
    pruned, shrunk = result.stage_models["pruned"], result.model  # stage_models["shrunk"]: the ONNX file read back
    attentions = [m for m in pruned.modules() if isinstance(m, nn.MultiheadAttention)]
    assert [int(zero_heads(a).sum()) for a in attentions] == [2] * len(attentions)
    assert [m.num_heads for m in shrunk.modules() if isinstance(m, HeadPrunedAttention)] == [2] * len(attentions)
    assert result.shrink.heads_removed == 2 * len(attentions)
    assert "attention heads removed" in result.report["shrunk"].description
    assert "50% of the attention heads" in result.report["pruned"].description
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), pruned(x), rtol=1e-4, atol=1e-5)
        loaded, _ = load_quantized(result.artifact)  # the narrowed attention exports to ONNX and runs there
        torch.testing.assert_close(loaded(x[:8]), shrunk(x[:8]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.stage_models["shrunk"](x[:8]), shrunk(x[:8]), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, HeadPrunedAttention) for m in model.modules())  # the user's model is untouched


def test_shrink_reports_the_heads_it_removed_and_the_attentions_it_could_not_narrow():
    torch.manual_seed(0)
    model = nn.ModuleDict({"self": nn.MultiheadAttention(16, 4), "biased": nn.MultiheadAttention(16, 4,
                                                                                                   add_bias_kv=True)})
    for attention in model.values():
        _zero_values_(attention, [0, 2])

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return sum(a(x, x, x, need_weights=False)[0] for a in self.inner.values())

    result = shrink(Both(), torch.randn(5, 2, 16))
    assert [(h.name, h.heads_before, h.heads_after) for h in result.report.heads] == [("inner.self", 4, 2)]
    assert result.report.kept == (("inner.biased", "its zero heads stay: it adds learned key/value biases "
                                   "(add_bias_kv)"),)
    assert "inner.self" in result.report.table() and "heads of 4" in result.report.table()


def test_prune_config_heads_must_be_a_fraction():
    for bad in (1.0, -0.1, True, "half"):
        with pytest.raises(ValueError, match=r"PruneConfig\(heads=.*\[0, 1\)"):
            PruneConfig(sparsity=0.5, heads=bad)
    assert "25% of the attention heads" in PruneConfig(sparsity=0.5, heads=0.25).describe()
    assert PruneConfig(sparsity=0.5, heads=0.5).heads_at(0.25) == 0.25


def test_a_narrowed_attention_is_traced_as_one_module_by_shrink_and_torch_ao():
    from litcompress.pruning.shrink import channel_plan
    from litcompress.quantization import PTQConfig, quantize, sqnr_db

    torch.manual_seed(0)
    model = GatedTransformerClassifier(heads=4).eval()
    x = torch.randn(8, 1, 8, 8)
    prune_heads_(model, 0.5)
    narrowed = shrink(model, x).model
    # its forward branches on the inputs' shapes, as torch's attention does: fx keeps both whole
    reasons = channel_plan(narrowed).removable()
    assert reasons["blocks.0.attention.q_proj"].startswith(
        "it is inside blocks.0.attention (HeadPrunedAttention: an attention shrink already narrowed")
    again = shrink(narrowed, x)  # a shrunk model shrinks again (nothing left to remove here)
    assert again.report.layers == () and again.report.heads == ()
    result = quantize(narrowed, PTQConfig(approach="static", backends=("torch_ao",), latency_repeats=2),
                      eval_fn=lambda m: 1.0, calibration_data=[x])
    assert result.recipe is not None and [t.error for t in result.trials] == [None]
    with torch.no_grad():
        assert sqnr_db(narrowed(x), result.model(x)) > 15.0


def test_rewriting_every_attention_as_head_pruned_keeps_outputs_and_leaves_what_it_cannot_rewrite():
    torch.manual_seed(0)
    model = nn.Transformer(32, 4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, dropout=0.0,
                           batch_first=True).eval()
    source, target = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, -3:] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (the decoder is told the padding too: torch's fast path writes zeros there, the slow path does not)
        masks = dict(tgt_mask=causal, src_key_padding_mask=padding, memory_key_padding_mask=padding)
        expected = model(source, target, **masks)
        rewritten = rewrite_attentions_(model)
        got = rewritten(source, target, **masks)
    assert rewritten is model
    assert sum(isinstance(m, HeadPrunedAttention) for m in model.modules()) == 3  # encoder self, decoder self + cross
    assert not any(type(m) is nn.MultiheadAttention for m in model.modules())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with_bias_kv = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    assert rewrite_attentions_(with_bias_kv) is with_bias_kv  # its extra key/value rows have no counterpart
    assert isinstance(rewrite_attentions_(nn.MultiheadAttention(8, 2)), HeadPrunedAttention)


def test_prune_heads_keeps_the_zeros_another_pruner_put_in_the_same_projection():
    """Before, a round replaced in_proj_weight's mask with the heads' own, undoing another pruner's zeros there."""
    from litcompress.pruning import prune_

    torch.manual_seed(0)
    holder = Holder(nn.MultiheadAttention(8, 4))
    attention = holder.attention
    prune_([(attention, "in_proj_weight")], "l1_unstructured", 0.5)
    before = attention.in_proj_weight_mask.clone()
    prune_heads_(holder, 0.5)
    after = attention.in_proj_weight_mask
    assert int(zero_heads(attention).sum()) == 2
    assert bool((after <= before).all()) and int((after == 0).sum()) > int((before == 0).sum())


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True, kdim=8, vdim=8)

    def forward(self, query, memory):
        return self.attention(query, memory, memory, need_weights=False)[0]


def test_an_attention_with_its_own_key_and_value_widths_keeps_its_zero_heads_and_says_why():
    """kdim/vdim: the values have a projection of their own (no in_proj_weight); its zero heads are found there,
    and stay (the narrowed attention has one projection), with the reason in the report."""
    torch.manual_seed(0)
    model = CrossAttention().eval()
    inputs = (torch.randn(2, 5, 16), torch.randn(2, 7, 8))
    assert shrink(model, inputs).report.kept == ()  # no zero head: nothing to say
    with torch.no_grad():
        model.attention.v_proj_weight[:4] = 0  # head 0's value rows
        model.attention.in_proj_bias[32:36] = 0  # and its value bias
    assert zero_heads(model.attention).tolist() == [True, False, False, False]
    result = shrink(model, inputs)
    assert result.report.kept == (("attention", "its zero heads stay: its keys and values have their own widths "
                                                "(kdim/vdim)"),)
    assert result.report.heads == ()


class AttentionWeightsOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x)  # torch's default need_weights=True: the weights averaged over the heads


def test_a_check_that_fails_after_heads_went_names_them_and_the_likely_causes():
    torch.manual_seed(0)
    model = AttentionWeightsOut().eval()
    prune_heads_(model, 0.5)
    with pytest.raises(ValueError, match=r"Shrunk: \['attention \(2 heads\)'\]\. Attentions lost heads: .*"
                                         r"need_weights=True"):
        shrink(model, torch.randn(2, 5, 16))


class _SharedAttention(nn.Module):
    """One attention registered under two names (its weights shared by two blocks, ALBERT-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.block = nn.Module()
        self.block.attn = self.attn
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(x, x, x, need_weights=False)[0]
        return self.out(self.block.attn(y, y, y, need_weights=False)[0].mean(1))


def test_an_attention_under_two_names_is_replaced_at_both_and_stays_shared():
    """It was replaced at the first name only: the shrunk model held the narrow copy and the whole torch attention,
    untied, and grew (1,122 -> 1,674 parameters) while the report said 4 -> 2 heads."""
    torch.manual_seed(0)
    model = _SharedAttention().eval()
    prune_heads_(model, 0.5)
    x = torch.randn(2, 5, 16)
    result = shrink(model, x)
    assert result.model.attn is result.model.block.attn and isinstance(result.model.attn, HeadPrunedAttention)
    assert result.report.parameters_after < result.report.parameters_before
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nested", [True, False])
def test_taking_an_encoder_off_torchs_nested_tensor_path_is_said(nested):
    """With a src_key_padding_mask in eval mode, torch's nested-tensor path outputs zeros at padded positions, which
    the shrunk encoder (regular path) does not: a readout summing over them changed without a word."""
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
            self.out = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
            return self.out(self.enc(x, src_key_padding_mask=padded).sum(1))

    torch.manual_seed(0)
    model = Classifier().eval()
    prune_heads_(model, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = shrink(model)
    said = [str(w.message) for w in caught if "nested-tensor fast path" in str(w.message)]
    assert len(said) == (1 if nested else 0) and (not said or "TransformerEncoder(s) enc took" in said[0])
    x, padded = torch.randn(2, 6, 16), torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    with torch.no_grad():
        before = model.enc(x, src_key_padding_mask=padded)
        after = result.model.enc(x, src_key_padding_mask=padded)
    real = ~padded
    torch.testing.assert_close(after[real], before[real], rtol=1e-4, atol=1e-5)  # the real positions: the same
    assert bool((before[padded] == 0).all()) == nested  # what the note says the shrunk model no longer does


def test_head_pruned_attention_returns_the_weights_it_attended_with_after_dropout_as_torch_does():
    """In training with dropout it returned the weights before dropout (rows summing to 1), torch those after."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True).train()
    rewritten = rewrite_attentions_(deepcopy_model(attention))
    query, key = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    for average in (False, True):
        torch.manual_seed(1)
        expected = attention(query, key, key, average_attn_weights=average)
        torch.manual_seed(1)
        got = rewritten(query, key, key, average_attn_weights=average)
        torch.testing.assert_close(got, expected)  # (the same draws: one dropout over the same weights)


def test_head_pruned_attention_takes_is_causal_without_a_mask_where_torch_does():
    """It honoured is_causal without a mask, but ignored it beside a key padding mask. torch refuses both, except on
    its fused inference path (self-attention, eval, no grad, batch first), which ignores the hint."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    rewritten = rewrite_attentions_(deepcopy_model(attention))
    x, other = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, -2:] = True
    for module in (attention, rewritten):
        for padding_mask in (None, padding):
            with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
                module(x, x, x, key_padding_mask=padding_mask, is_causal=True, need_weights=False)
            with torch.no_grad(), pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal"):
                module(x, other, other, key_padding_mask=padding_mask, is_causal=True)  # (not self-attention)
    with torch.no_grad():
        for padding_mask in (None, padding):
            for need_weights in (False, True):
                kwargs = dict(key_padding_mask=padding_mask, need_weights=need_weights)
                expected = attention(x, x, x, **kwargs)
                torch.testing.assert_close(attention(x, x, x, is_causal=True, **kwargs), expected)  # (ignored)
                torch.testing.assert_close(rewritten(x, x, x, is_causal=True, **kwargs), expected, rtol=1e-5,
                                           atol=1e-5)
        for module in (attention, rewritten):  # a float padding mask keeps torch off that path: refused
            with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
                module(x, x, x, key_padding_mask=padding.float(), is_causal=True)
    without_bias = nn.MultiheadAttention(16, 4, batch_first=True, bias=False).eval()  # (torch's fused call needs them)
    for module in (without_bias, rewrite_attentions_(deepcopy_model(without_bias))):
        with torch.no_grad(), pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
            module(x, x, x, is_causal=True)
    # grad on, but nothing requires it (a frozen model): torch's fused path too
    for module in (attention, rewritten):
        module.requires_grad_(False)
    torch.testing.assert_close(rewritten(x, x, x, is_causal=True)[0], attention(x, x, x)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(x, x, x, is_causal=True)[0], attention(x, x, x)[0])
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        for padding_mask in (None, padding):
            for need_weights in (False, True):
                kwargs = dict(key_padding_mask=padding_mask, attn_mask=causal, is_causal=True,
                              need_weights=need_weights)
                torch.testing.assert_close(rewritten(x, x, x, **kwargs), attention(x, x, x, **kwargs), rtol=1e-5,
                                           atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(heads=st.sampled_from([1, 2, 3, 4, 6, 8]), head_dim=st.sampled_from([2, 4, 6, 8]),
       multiple=st.sampled_from([1, 4, 8, 16, 24]), zero=st.data(), seed=st.integers(0, 2**16))
def test_shrink_keeps_a_multiple_of_keep_multiple_of_channels_in_each_attention_and_every_output(heads, head_dim,
                                                                                              multiple, zero, seed):
    """keep_multiple_of was ignored for attention heads: 5 of 8 heads of 8 channels kept 40 with a multiple of 16."""
    torch.manual_seed(seed)
    embed = heads * head_dim
    holder = Holder(nn.MultiheadAttention(embed, heads, batch_first=True)).eval()
    dead = sorted(zero.draw(st.sets(st.integers(0, heads - 1))))
    _zero_values_(holder.attention, dead)
    x = torch.randn(2, 5, embed)
    with torch.no_grad():
        expected = holder(x)
    result = shrink(holder, (x,), keep_multiple_of=multiple)
    replaced = result.model.attention
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), expected, rtol=1e-5, atol=1e-5)
    alive = heads - len(dead) or 1
    # the fewest heads, at least those alive, whose channels are a multiple (all of them where none is)
    fits = [k for k in range(alive, heads + 1) if k * head_dim % multiple == 0]
    kept_heads = fits[0] if fits else heads
    if kept_heads == heads:
        assert not isinstance(replaced, HeadPrunedAttention)
        assert result.report.heads_removed == 0
        said = [why for _, why in result.report.kept if "leaves none of its zero heads to remove" in why]
        assert len(said) == (alive < heads)  # (the multiple kept them, not a single zero head with nothing to remove)
    else:
        assert isinstance(replaced, HeadPrunedAttention) and replaced.num_heads == kept_heads
        widths = {replaced.q_proj.out_features, replaced.k_proj.out_features, replaced.v_proj.out_features,
                  replaced.out_proj.in_features}
        assert widths == {kept_heads * head_dim} and kept_heads * head_dim % multiple == 0
        assert result.report.heads_removed == heads - kept_heads
        stay = [why for _, why in result.report.kept if "of its zero heads stay" in why]
        live = heads - len(dead)  # (with none live, the head kept adds nothing too: zero, it is counted)
        assert stay == ([f"{kept_heads - live} of its zero heads stay: keeping a multiple of {multiple} channels "
                         f"({head_dim} per head)"] if kept_heads > alive else [])  # (said, not kept without a word)


@pytest.mark.parametrize("heads, head_dim, multiple, fraction, pruned", [
    (8, 8, 16, 0.4, 2),   # 3 rounded to 2: six heads of 8 keep 48 channels
    (8, 8, 16, 0.5, 4),   # 4 already leaves 32
    (8, 6, 16, 0.5, 0),   # a multiple of 16 in heads of 6 is 8 heads (48): every head stays
    (6, 4, 8, 0.9, 4),    # 5 of 6 would leave one head (4 channels): two stay
])
def test_prune_heads_with_keep_multiple_of_masks_fewer_heads_so_the_rest_fill_the_multiple(heads, head_dim, multiple,
                                                                                          fraction, pruned):
    holder = Holder(nn.MultiheadAttention(heads * head_dim, heads))
    assert prune_heads_(holder, fraction, keep_multiple_of=multiple) == {"attention": pruned}
    assert int(zero_heads(holder.attention).sum()) == pruned
    assert prune_heads_(Holder(nn.MultiheadAttention(heads * head_dim, heads)), fraction) == {
        "attention": min(round(fraction * heads), heads - 1)}  # (without it, as before)


@pytest.mark.parametrize("method", ["ln_structured", "l1_unstructured"])
def test_the_pipeline_prunes_and_shrinks_heads_to_a_multiple_of_keep_multiple_of(method, tmp_path):
    """Heads are removed whatever the method prunes beside them: with an unstructured one they were pruned without
    the multiple, and shrink kept a pruned head of each attention (zero, trained for nothing)."""
    torch.manual_seed(0)
    model = TransformerClassifier(heads=8)
    attentions = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    x = torch.randn(16, 1, 8, 8)
    config = CompressionConfig(prune=PruneConfig(sparsity=0.25, method=method, heads=0.4),
                               keep_multiple_of=2 * attentions[0].head_dim, fp32_format="onnx", latency_repeats=2)
    result = compress(model, config, eval_fn=lambda m: 1.0, example_inputs=x, output_dir=tmp_path)
    pruned = [m for m in result.stage_models["pruned"].modules() if isinstance(m, nn.MultiheadAttention)]
    assert [int(zero_heads(a).sum()) for a in pruned] == [2] * len(attentions)  # round(0.4 * 8) = 3, rounded to 2
    shrunk = [m for m in result.model.modules() if isinstance(m, HeadPrunedAttention)]
    assert [m.num_heads for m in shrunk] == [6] * len(attentions)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), result.stage_models["pruned"](x), rtol=1e-4, atol=1e-5)


def test_a_heads_fraction_that_keep_multiple_of_rounds_to_no_head_is_refused_before_the_pipeline_runs(tmp_path):
    """0.1 of 8 heads of 4 channels prunes one; keeping a multiple of 8 channels (an even count) prunes none: the
    pipeline pruned no head and its report said 10% of them."""
    model = TransformerClassifier(heads=8)
    calls = []
    config = CompressionConfig(prune=PruneConfig(sparsity=0.25, method="ln_structured", heads=0.1), keep_multiple_of=8,
                               fp32_format="onnx", latency_repeats=2)
    with pytest.raises(ValueError, match=r"PruneConfig\(heads=0.1\): 0.1 of each attention's heads prunes none "
                                         r"in encoder.layers.0.self_attn \(8\), encoder.layers.1.self_attn \(8\); "
                                         r"0.188 or more prunes one in each. No head would be pruned."):
        compress(model, config, eval_fn=lambda m: calls.append(m) or 1.0, example_inputs=torch.randn(4, 1, 8, 8),
                 output_dir=tmp_path)
    assert calls == []
    with pytest.raises(ValueError, match=r"PruneConfig\(heads=0.1\): .* No head would be pruned."):  # its preview
        preview_shrink(model, config.prune, keep_multiple_of=8, example_inputs=torch.randn(4, 1, 8, 8))
    config = dataclasses.replace(config, keep_multiple_of=None)  # one head of each, as before
    compress(model, config, eval_fn=lambda m: 1.0, example_inputs=torch.randn(4, 1, 8, 8), output_dir=tmp_path)


@pytest.mark.parametrize("value", [0, -16, True, 16.0, "16"])
def test_prune_heads_refuses_a_keep_multiple_of_that_is_no_positive_int_before_masking(value):
    holder = Holder(nn.MultiheadAttention(64, 8))
    with pytest.raises(ValueError, match=r"prune_heads_\(keep_multiple_of=.*\): expected an int >= 1"):
        prune_heads_(holder, 0.4, keep_multiple_of=value)
    assert int(zero_heads(holder.attention).sum()) == 0
