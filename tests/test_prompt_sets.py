"""The JSONL prompt-set format and the shipped multilingual set (issue 16 item 7)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from omnidiff.contracts.prompt_sets import PromptSetError, load_prompt_set, select_prompt_set

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "prompts" / "multilingual_v1.jsonl"
LANGS = {"en", "de", "fr", "es", "zh", "ja", "ko", "ru"}


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(**fields) -> str:
    return json.dumps({"prompt": "a red fox", "lang": "en", "length": "short"} | fields, ensure_ascii=False)


def test_the_shipped_set_has_short_and_long_prompts_in_every_language():
    frame = load_prompt_set(SHIPPED)
    assert set(frame["lang"]) == LANGS
    counts = frame.groupby(["lang", "length"]).size()
    for lang in LANGS:
        assert counts[(lang, "short")] >= 3 and counts[(lang, "long")] >= 2, (lang, counts)
    assert frame["id"].is_unique
    other = frame[frame["lang"] != "en"]
    assert (other["prompt"] != other["prompt_en"]).all()  # translated, with an English reference
    english = frame[frame["lang"] == "en"]
    assert (english["prompt"] == english["prompt_en"]).all()


def _clip_tokens_at_least(text: str) -> int:
    """A lower bound of CLIP's token count: every word and every punctuation mark is at least one BPE
    token, plus <bos> and <eos>."""
    return len(re.findall(r"[A-Za-z0-9'-]+|[^\sA-Za-z0-9'-]", text)) + 2


def test_long_references_run_past_clips_window_and_short_ones_do_not_come_close():
    frame = load_prompt_set(SHIPPED)
    for row in frame.itertuples():
        words = len(row.prompt_en.split())
        if row.length == "long":
            assert _clip_tokens_at_least(row.prompt_en) > 77, (row.id, _clip_tokens_at_least(row.prompt_en))
        else:
            assert words <= 15, (row.id, words)


def test_blank_lines_are_skipped_and_rows_keep_their_line_numbers(tmp_path):
    path = _write(tmp_path, [_row(id="a"), "", _row(prompt="Ein Fuchs", lang="de", prompt_en="A fox", id="b")])
    frame = load_prompt_set(path)
    assert frame["line"].tolist() == [1, 3]
    assert frame.loc[1, "prompt_en"] == "A fox" and frame.loc[0, "prompt_en"] == "a red fox"
    default = load_prompt_set(_write(tmp_path, [_row()]))
    assert default.loc[0, "id"] == "set:1"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"set\.jsonl:2: not valid JSON"),
        ('["a list"]', r"set\.jsonl:2: expected a JSON object, got list"),
        (_row(colour="red"), r"set\.jsonl:2: unknown field\(s\) \['colour'\]"),
        (json.dumps({"prompt": "x", "lang": "en"}), r"set\.jsonl:2: missing field 'length'"),
        (_row(length="medium"), r"set\.jsonl:2: field 'length'='medium': must be one of \['short', 'long'\]"),
        (_row(lang="German"), r"set\.jsonl:2: field 'lang'='German': expected a language code"),
        (_row(prompt="  "), r"set\.jsonl:2: field 'prompt'='  ': expected a non-empty string"),
        (_row(prompt="Ein Fuchs", lang="de"), r"set\.jsonl:2: missing field 'prompt_en'.*lang='de'"),
        (_row(prompt="Ein Fuchs", lang="de", prompt_en=3), r"set\.jsonl:2: field 'prompt_en'=3"),
        (_row(prompt="another", id="first"), r"set\.jsonl:2: field 'id'='first' already used on line 1"),
        (_row(id="second"), r"set\.jsonl:2: field 'prompt': the same en prompt as line 1"),
    ],
)
def test_a_bad_line_is_refused_naming_the_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path, [_row(id="first"), line])
    with pytest.raises(PromptSetError, match=message):
        load_prompt_set(path)


def test_an_empty_or_missing_file_is_refused(tmp_path):
    with pytest.raises(PromptSetError, match="no prompts"):
        load_prompt_set(_write(tmp_path, [""]))
    with pytest.raises(PromptSetError, match="no such prompt-set file"):
        load_prompt_set(tmp_path / "absent.jsonl")


def test_selecting_languages_and_lengths():
    frame = load_prompt_set(SHIPPED)
    part = select_prompt_set(frame, ["de", "ja"], ["long"])
    assert set(part["lang"]) == {"de", "ja"} and set(part["length"]) == {"long"}
    assert len(part) == int(((frame["lang"].isin(["de", "ja"])) & (frame["length"] == "long")).sum())
    with pytest.raises(PromptSetError, match=r"langs=\['xx'\]: \['xx'\] not in the prompt set"):
        select_prompt_set(frame, ["xx"])
