"""The export's card.json (train/export.py) is what the server reads as the model's card (serve/models.py).

    .venv/bin/pytest tests/test_export_card.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_export_card_keeps_short_val_prompts_per_language_and_the_base_sizes(tmp_path):
    from serve.models import _folder_reader, model_facts
    from train.export import export_card

    prompts = [{"prompt": f"a red circle {i}", "lang": "en", "group": "short"} for i in range(3)]
    prompts += [{"prompt": "一个红色的圆", "lang": "zh", "group": "short"},
                {"prompt": "a red circle " + "and more words " * 40, "lang": "en", "group": "long"}]
    base = tmp_path / "base"
    base.mkdir()
    card = export_card(prompts, base)
    # Two per language, short ones only (a playground button holds a short prompt); no sizes: the trained one.
    assert card == {"example_prompts": [{"prompt": "a red circle 0", "lang": "en"},
                                        {"prompt": "a red circle 1", "lang": "en"},
                                        {"prompt": "一个红色的圆", "lang": "zh"}]}
    (base / "card.json").write_text(json.dumps({"sizes": ["512x512", "768x512"]}))
    assert export_card(prompts, base)["sizes"] == ["512x512", "768x512"]  # a real base lists several

    # What the server makes of it.
    export = tmp_path / "export"
    (export / "unet").mkdir(parents=True)
    (export / "unet" / "config.json").write_text(json.dumps({"sample_size": 64}))
    (export / "card.json").write_text(json.dumps(export_card(prompts, base), ensure_ascii=False))
    facts = model_facts(_folder_reader(export), "export")
    assert facts["sizes"] == ["512x512", "768x512"] and facts["native_size"] == "64x64"
    assert facts["example_prompts"][2] == {"prompt": "一个红色的圆", "lang": "zh"}


@pytest.mark.e2e
def test_a_trained_export_carries_its_sample_prompts_as_the_cards_examples(train_overrides, train_snapshot):
    """A real (tiny) stage-1 training: the export's card.json holds short val captions of its snapshot."""
    from omnidiff.config import load_config
    from omnidiff.contracts.snapshot import Snapshot
    from serve.models import _folder_reader, model_facts
    from train import run
    from train.config import TrainConfig

    config = Path(__file__).resolve().parents[1] / "configs" / "train_test_stage1.yaml"
    result = run(load_config(TrainConfig, config, train_overrides("card-s1", **{"samples.per_group": 1})))
    export = Path(result["export_dir"])
    facts = model_facts(_folder_reader(export), str(export))
    assert facts["sizes"] == ["16x16"]  # the base model's training size: its card lists none
    examples = facts["example_prompts"]
    lineage = json.loads((export / "lineage.json").read_text())
    snapshot = Snapshot.open(train_snapshot)  # the export's lineage names it portably (by digest, no path)
    assert lineage["snapshot"]["digest"] == snapshot.digest
    pairs = snapshot.pairs(["caption", "lang", "split"]).to_pandas()
    val = pairs[pairs["split"] == "val"]
    assert examples and len({e["lang"] for e in examples}) == len(examples)  # one per language at per_group=1
    for example in examples:
        row = val[val["caption"] == example["prompt"]]
        assert len(row) and set(row["lang"]) == {example["lang"]}, example
