"""Language-model contexts: a loader for local transformers checkpoints, and a
generator of small random checkpoints for tests, examples and benchmarks.

Nothing here downloads: :func:`load_causal_lm` reads a local directory with
``local_files_only=True``, and :func:`make_model` writes one from a config with
small dimensions, random weights and a word-level tokenizer it builds itself.

torch and transformers (the ``llm`` extra; transformers 4.56 and later, 5.x
included) are imported only when a model is built or loaded: importing this module,
or ``dask_context``, imports neither.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from dask.sizeof import sizeof

logger = logging.getLogger(__name__)

LLM_EXTRA = 'pip install "dask-context[llm]" (GPU users: install their CUDA build of torch first)'


def _import_llm() -> tuple[Any, Any]:
    """torch and transformers, or an ImportError that says how to install them."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"dask_context.models needs torch and transformers ({e}): {LLM_EXTRA}") from e
    # the checkpoint's shards are written and read in tests, examples and workers:
    # their progress bars would only clutter the logs
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers

# Llama-style decoder sizes. "tiny" is ~0.4 MB (tests); "bench" is 106 M parameters,
# 423 MB of float32 weights (benchmarks). From a warm page cache safetensors maps even
# "bench" in tens of milliseconds; the first load in a process also pays the ~2 s
# import of transformers, and benchmarks/loading.py models a cold read from storage.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=0),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, vocab_size=8192),
    "bench": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                  num_attention_heads=12, vocab_size=32000),
}

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]

# Words of the tokenizer: what the fact-verification prompts are made of.
WORDS = """
claim is the true false unknown answer or a an of in on at to by for from with and
was were has have had did does not no yes it its this that these those which who
what when where why how than then there their they he she his her we our you your
river mountain city country lake ocean island desert forest capital border bridge
tower castle museum library university company bank airport railway harbour stadium
longest highest largest smallest oldest newest deepest widest busiest tallest
located founded built discovered named opened closed crossed flows lies borders
north south east west northern southern eastern western central
paris london berlin madrid rome vienna prague lisbon dublin oslo athens warsaw
france england germany spain italy austria czechia portugal ireland norway greece
poland danube rhine thames seine tagus vistula alps pyrenees carpathians everest
europe asia africa america australia antarctica atlantic pacific indian arctic earth
century year years million thousand hundred kilometres metres people inhabitants
first second third last more less most least about around nearly over under
""".split()


def build_tokenizer(words: Sequence[str] = WORDS) -> Any:
    """A lower-casing word-level tokenizer over ``words`` and digits.

    Returns a ``transformers`` fast tokenizer that pads on the left, as batched
    next-token scoring with a decoder needs.
    """
    _import_llm()
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*SPECIAL, *".,?!:;'-()", *"0123456789", *words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        padding_side="left",
    )


def make_model(path: str | os.PathLike[str], preset: str = "tiny", seed: int = 0, **overrides: int) -> Path:
    """Write a random Llama-style checkpoint and its tokenizer to ``path``.

    The directory is reused when it already holds the same preset, seed and
    overrides, and written atomically otherwise, so concurrent callers are safe.

    Parameters
    ----------
    path
        Target directory.
    preset
        A key of :data:`PRESETS`.
    seed
        Seed of the random weights.
    **overrides
        Config fields to change, e.g. ``num_hidden_layers=12``.

    Returns
    -------
    The directory, loadable with ``from_pretrained`` / :func:`load_causal_lm`.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    path = Path(path)
    # "format" 2: a tokenizer that transformers 4.x loads too (directories written
    # before are written again)
    recipe = {"preset": preset, "seed": seed, "format": 2, **PRESETS[preset], **overrides}
    marker = path / "dask-context-model.json"
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return path

    torch, _ = _import_llm()
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    dims = {k: v for k, v in recipe.items() if k not in ("preset", "seed", "format")}
    dims["vocab_size"] = max(dims["vocab_size"], len(tokenizer))
    config = LlamaConfig(
        **dims,
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # transformers 5 names the class "TokenizersBackend", which 4.x cannot
        # load; both know it as PreTrainedTokenizerFast
        config_file = tmp / "tokenizer_config.json"
        tok_config = json.loads(config_file.read_text())
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(tok_config, indent=2))
        (tmp / "dask-context-model.json").write_text(json.dumps(recipe))
        if marker.exists() and json.loads(marker.read_text()) == recipe:
            return path  # another process wrote the same model meanwhile
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first
            if not (marker.exists() and json.loads(marker.read_text()) == recipe):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Wrote %s model (%s parameters) to %s", preset, f"{model.num_parameters():,}", path)
    return path


class LanguageModel:
    """A causal language model and its tokenizer, pinned to one device.

    Parameters
    ----------
    model
        A ``transformers`` causal LM, in eval mode, on ``device``.
    tokenizer
        Its tokenizer; it must pad on the left.
    device
        Where the model lives (``"cpu"``, ``"cuda:0"``...).
    """

    def __init__(self, model: Any, tokenizer: Any, device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """Log-probability of each candidate word coming right after each prompt.

        Returns
        -------
        Array of shape ``(len(prompts), len(candidates))``.
        """
        import torch

        ids = [self.tokenizer.convert_tokens_to_ids(c) for c in candidates]
        batch = self.tokenizer(list(prompts), padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = self.model(**batch).logits[:, -1, :]
            logprobs = torch.log_softmax(logits.float(), dim=-1)[:, ids]
        return logprobs.cpu().numpy()

    def __repr__(self) -> str:
        return f"LanguageModel({type(self.model).__name__}, device={self.device!r})"


@sizeof.register(LanguageModel)
def _sizeof_language_model(lm: LanguageModel) -> int:
    # what a worker's memory budget is spent on: the weights
    return sizeof(lm.model)


def load_causal_lm(path: str | os.PathLike[str], device: str = "cpu", dtype: str = "float32") -> LanguageModel:
    """Load a causal LM and its tokenizer from a local directory onto ``device``.

    This is the loader to put in a :class:`~dask_context.ContextSpec`; dask-context
    passes the worker's device in.

    Examples
    --------
    .. code-block:: python

        spec = ContextSpec("verifier", load_causal_lm, args=["/models/llm"])
    """
    torch, _ = _import_llm()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=getattr(torch, dtype)
    )
    return LanguageModel(model.to(device).eval(), tokenizer, device)
