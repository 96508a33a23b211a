"""Evaluation: LAMBADA, WikiText and held-out perplexity, Table-1 reports and Figure-2 plots.

- `scoring`: per-token NLL from a GPT with the LM head applied over chunks of rows.
- `lambada`, `wikitext`, `heldout`: the three tasks (also called by the trainer during training).
- `models`: load a model and its tokenizer from an HF folder, a hub name or a run directory.
- `suite`: the `launch/evaluate.py` entry (tasks -> one results dict).
- `report`, `plots`: the paper's Table 1 (Markdown) and Figure 2 (PNGs).
"""


class EvalError(Exception):
    """Bad evaluation input (model, tokenizer, data file) described for the user as is.

    The launch scripts print its message without a traceback and exit with status 2.
    """
