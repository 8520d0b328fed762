import json

import numpy as np
import pytest
from dask.sizeof import sizeof

from dask_context.factcheck import LABELS, judge, make_claims
from dask_context.models import build_tokenizer, load_causal_lm, make_model


def test_generated_model_loads_with_from_pretrained(model_dir):
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    lm = load_causal_lm(model_dir)
    assert lm.device == "cpu" and not lm.model.training
    scores = lm.next_token_logprobs(["claim : the alps lie in austria", "answer :"], list(LABELS))
    assert scores.shape == (2, 3) and np.all(scores <= 0)
    # the context's size is its weights and buffers
    tensors = [*lm.model.parameters(), *lm.model.buffers()]
    assert sizeof(lm) == sum(t.numel() * t.element_size() for t in tensors)


def test_model_directory_is_reused_and_rebuilt_when_the_recipe_changes(tmp_path):
    path = make_model(tmp_path / "m", preset="tiny")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert make_model(tmp_path / "m", preset="tiny") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    make_model(tmp_path / "m", preset="tiny", seed=1)
    assert json.loads((path / "dask-context-model.json").read_text())["seed"] == 1
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_model(tmp_path / "x", preset="huge")


def test_verdicts_do_not_depend_on_batching(model_dir):
    lm = load_causal_lm(model_dir)
    claims = make_claims(12)
    together = judge(lm, claims)
    alone = [judge(lm, [c])[0] for c in claims]
    assert [v["verdict"] for v in together] == [v["verdict"] for v in alone]
    assert [v["claim"] for v in together] == claims
    assert judge(lm, []) == []


def test_tokenizer_pads_left_and_knows_the_prompt_words():
    tok = build_tokenizer()
    batch = tok(["claim : the danube", "answer"], padding=True)
    assert batch["input_ids"][1][0] == tok.pad_token_id
    assert tok.unk_token_id not in tok("is the claim true , false or unknown ?")["input_ids"]


def test_generated_tokenizer_loads_with_transformers_4_and_5(model_dir):
    # 5.x would name it TokenizersBackend, a class 4.x does not have; CI loads the
    # same kind of checkpoint with 4.x (.ci/run, the oldest-release venv)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
