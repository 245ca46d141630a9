"""Captions of the tiny world: templates in eight languages, each with its parallel English.

(Over 400 lines on purpose: three quarters of it is one table, each language's lexicon, templates
and word agreement in a block, then the filler sentences in all eight; it reads best in one place.)

    from omnidiff.world.captions import CaptionSpec, caption
    spec = CaptionSpec("cross", "red", "centre", "large", "black", template=0)
    caption(spec, "de")  # 'ein großes rotes Kreuz in der Mitte auf schwarzem Hintergrund'

Trained languages (captions, url list, parallel texts): en, zh, ja, es, de, fr.
Zero-shot languages (eval prompts only, never in training data): ru, ko.

Template ``i`` of every language is a translation of English template ``i``, so
a spec rendered in any language has the same English parallel. A long caption
puts filler sentences (no attribute words) first and the decisive sentence last,
so in English its attributes start after the 77-token CLIP window (PAPER.md:
the LLM reads far past 77 tokens, CLIP does not).

The base model's CLIP-style tokenizer is English word-level; it is built from
:func:`english_vocabulary` with the split of :func:`clip_tokens` (lowercase,
regex ``\\w+|[^\\w\\s]``), so :func:`clip_token_count` is its length before BOS/EOS.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import numpy as np

from omnidiff.world.attributes import ATTRIBUTES, PROMPT_ATTRIBUTES

LANGUAGES: tuple[str, ...] = ("en", "zh", "ja", "es", "de", "fr", "ru", "ko")
TRAINED_LANGUAGES: tuple[str, ...] = ("en", "zh", "ja", "es", "de", "fr")
ZERO_SHOT_LANGUAGES: tuple[str, ...] = ("ru", "ko")
NUM_TEMPLATES = 5
CLIP_WINDOW = 77  # CLIP's context: BOS + 75 tokens + EOS

_CLIP_SPLIT = re.compile(r"\w+|[^\w\s]")


def clip_tokens(text: str) -> list[str]:
    """The word-level split of the project's CLIP-style tokenizer (no BOS/EOS)."""
    return _CLIP_SPLIT.findall(text.lower())


def clip_token_count(text_en: str) -> int:
    """Number of CLIP-style tokens of an English text, not counting BOS/EOS."""
    return len(clip_tokens(text_en))


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
    """What one caption says: the attributes, the phrasing, and (long captions) the filler.

    template: index into each language's templates (0..NUM_TEMPLATES-1).
    filler: indices into FILLERS, in order; empty for a short caption.
    """

    shape: str
    colour: str
    position: str
    size: str
    background: str
    template: int
    filler: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in PROMPT_ATTRIBUTES:
            value = getattr(self, name)
            if value not in ATTRIBUTES[name]:
                raise ValueError(f"{name}={value!r}: unknown value; expected one of {list(ATTRIBUTES[name])}")
        if not 0 <= self.template < NUM_TEMPLATES:
            raise ValueError(f"template={self.template!r}: must be in [0, {NUM_TEMPLATES})")
        for i in self.filler:
            if not 0 <= i < len(FILLERS):
                raise ValueError(f"filler={self.filler!r}: index {i} not in [0, {len(FILLERS)})")

    @property
    def is_long(self) -> bool:
        return bool(self.filler)

    def attrs(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in PROMPT_ATTRIBUTES}


def template_id(lang: str, template: int) -> str:
    """Names one phrasing of one language, e.g. ``"zh/t2"`` (the same for its short and long form)."""
    return f"{lang}/t{template}"


# ---------------------------------------------------------------------------
# Lexicons and templates, one block per language.
# ---------------------------------------------------------------------------

_POS_KEYS = ATTRIBUTES["position"]

# English ------------------------------------------------------------------
_EN_POS_IN = dict(zip(_POS_KEYS, (
    "in the top left corner", "in the top right corner", "in the bottom left corner",
    "in the bottom right corner", "in the centre",
), strict=True))  # fmt: skip
_EN_TEMPLATES = (
    "{np} {pos_in} on a {bg} background",
    "{size} {colour} {shape}, {pos_in}, {bg} background",
    "a picture of {np} {pos_in}, on a plain {bg} background",
    "on a {bg} background there is {np} {pos_in}",
    "the {shape} is {colour} and {size}, and it sits {pos_in} of a {bg} picture",
)


def _slots_en(s: CaptionSpec) -> dict[str, str]:
    # Size always comes before colour in English, so the article is always "a".
    return {
        "np": f"a {s.size} {s.colour} {s.shape}", "size": s.size, "colour": s.colour, "shape": s.shape,
        "pos_in": _EN_POS_IN[s.position], "bg": s.background,
    }  # fmt: skip


# Chinese ------------------------------------------------------------------
_ZH_SHAPE = dict(zip(ATTRIBUTES["shape"], ("圆形", "正方形", "三角形", "十字形", "菱形"), strict=True))
_ZH_COLOUR = dict(zip(ATTRIBUTES["colour"], ("红色", "橙色", "黄色", "绿色", "青色", "蓝色", "紫色", "粉色"), strict=True))
_ZH_SIZE = {"small": "小", "large": "大"}
_ZH_POS = dict(zip(_POS_KEYS, ("左上角", "右上角", "左下角", "右下角", "正中间"), strict=True))
_ZH_BG = {"black": "黑色", "grey": "灰色", "white": "白色"}
_ZH_TEMPLATES = (
    "{bg}背景上{pos}有一个{size}的{colour}{shape}",
    "{size}{colour}{shape}，{pos}，{bg}背景",
    "一张图片：{pos}是一个{size}的{colour}{shape}，背景是纯{bg}",
    "在{bg}的背景上，{pos}有一个{size}的{colour}{shape}",
    "这个{shape}是{colour}的，而且很{size}，它位于{bg}画面的{pos}",
)


def _slots_zh(s: CaptionSpec) -> dict[str, str]:
    return {
        "shape": _ZH_SHAPE[s.shape], "colour": _ZH_COLOUR[s.colour], "size": _ZH_SIZE[s.size],
        "pos": _ZH_POS[s.position], "bg": _ZH_BG[s.background],
    }  # fmt: skip


# Japanese -----------------------------------------------------------------
_JA_SHAPE = dict(zip(ATTRIBUTES["shape"], ("円", "正方形", "三角形", "十字", "ひし形"), strict=True))
_JA_COLOUR = dict(zip(ATTRIBUTES["colour"], ("赤", "オレンジ色", "黄色", "緑", "シアン", "青", "紫", "ピンク"), strict=True))
_JA_SIZE_ATTR = {"small": "小さな", "large": "大きな"}
_JA_SIZE_PRED = {"small": "小さく", "large": "大きく"}
_JA_POS = dict(zip(_POS_KEYS, ("左上", "右上", "左下", "右下", "中央"), strict=True))
_JA_BG = {"black": "黒", "grey": "灰色", "white": "白"}
_JA_TEMPLATES = (
    "{bg}の背景の{pos}にある{size}{colour}の{shape}",
    "{size}{colour}の{shape}、{pos}、{bg}の背景",
    "{bg}一色の背景の{pos}に{size}{colour}の{shape}が描かれた画像",
    "{bg}の背景の上、{pos}に{size}{colour}の{shape}があります",
    "{shape}は{colour}で{size_pred}、{bg}の画面の{pos}に置かれています",
)


def _slots_ja(s: CaptionSpec) -> dict[str, str]:
    return {
        "shape": _JA_SHAPE[s.shape], "colour": _JA_COLOUR[s.colour], "size": _JA_SIZE_ATTR[s.size],
        "size_pred": _JA_SIZE_PRED[s.size], "pos": _JA_POS[s.position], "bg": _JA_BG[s.background],
    }  # fmt: skip


# Spanish (nouns have gender; adjectives agree) ------------------------------
_ES_SHAPE = {"circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"),
             "cross": ("cruz", "f"), "diamond": ("rombo", "m")}  # fmt: skip
_ES_COLOUR = {"red": ("rojo", "roja"), "orange": ("naranja", "naranja"), "yellow": ("amarillo", "amarilla"),
              "green": ("verde", "verde"), "cyan": ("cian", "cian"), "blue": ("azul", "azul"),
              "purple": ("morado", "morada"), "pink": ("rosa", "rosa")}  # fmt: skip
_ES_SIZE_PRE = {"small": ("pequeño", "pequeña"), "large": ("gran", "gran")}
_ES_SIZE_POST = {"small": ("pequeño", "pequeña"), "large": ("grande", "grande")}
_ES_POS_IN = dict(zip(_POS_KEYS, (
    "en la esquina superior izquierda", "en la esquina superior derecha", "en la esquina inferior izquierda",
    "en la esquina inferior derecha", "en el centro",
), strict=True))  # fmt: skip
_ES_BG = {"black": ("negro", "negra"), "grey": ("gris", "gris"), "white": ("blanco", "blanca")}
_ES_TEMPLATES = (
    "{np} {pos_in} sobre un fondo {bg}",
    "{shape} {colour} {size_post}, {pos_in}, fondo {bg}",
    "una imagen de {np} {pos_in}, sobre un fondo {bg} liso",
    "sobre un fondo {bg} hay {np} {pos_in}",
    "{the} {shape} es {colour} y {size_post}, y está {pos_in} de una imagen {bg_f}",
)


def _slots_es(s: CaptionSpec) -> dict[str, str]:
    noun, gender = _ES_SHAPE[s.shape]
    g = 0 if gender == "m" else 1
    colour = _ES_COLOUR[s.colour][g]
    a, the = ("un", "el") if g == 0 else ("una", "la")
    return {
        "np": f"{a} {_ES_SIZE_PRE[s.size][g]} {noun} {colour}", "shape": noun, "colour": colour,
        "size_post": _ES_SIZE_POST[s.size][g], "pos_in": _ES_POS_IN[s.position], "the": the,
        "bg": _ES_BG[s.background][0], "bg_f": _ES_BG[s.background][1],
    }  # fmt: skip


# German (gender; adjective endings after "ein", nominative) ---------------
_DE_SHAPE = {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"),
             "cross": ("Kreuz", "n"), "diamond": ("Raute", "f")}  # fmt: skip
# Stems; "rosa" does not decline.
_DE_COLOUR = dict(zip(ATTRIBUTES["colour"], ("rot", "orange", "gelb", "grün", "türkis", "blau", "violett", "rosa"), strict=True))
_DE_SIZE = {"small": "klein", "large": "groß"}
_DE_ENDING = {"m": "er", "n": "es", "f": "e"}
_DE_POS_IN = dict(zip(_POS_KEYS, ("oben links", "oben rechts", "unten links", "unten rechts", "in der Mitte"), strict=True))
_DE_BG = {"black": "schwarz", "grey": "grau", "white": "weiß"}
_DE_TEMPLATES = (
    "{np} {pos_in} auf {bg_dat} Hintergrund",
    "{adjs} {shape}, {pos_in}, Hintergrund {bg}",
    "ein Bild: {np} {pos_in} auf einfarbig {bg_dat} Hintergrund",
    "auf {bg_dat} Hintergrund befindet sich {np} {pos_in}",
    "{the} {shape} ist {colour} und {size}, und {pron} liegt {pos_in} eines {bg_gen} Bildes",
)


def _de_decline(stem: str, gender: str, ending: str | None = None) -> str:
    """An adjective after "ein" / "eine" (nominative, ``gender``'s ending) or with ``ending`` (dative after
    "einem" / "einer": "en" in every gender). "rosa" does not decline."""
    if stem == "rosa":
        return stem
    return (stem[:-1] if stem.endswith("e") else stem) + (ending or _DE_ENDING[gender])


def _slots_de(s: CaptionSpec) -> dict[str, str]:
    noun, gender = _DE_SHAPE[s.shape]
    adjs = f"{_de_decline(_DE_SIZE[s.size], gender)} {_de_decline(_DE_COLOUR[s.colour], gender)}"
    article = "eine" if gender == "f" else "ein"
    bg = _DE_BG[s.background]
    return {
        "np": f"{article} {adjs} {noun}", "adjs": adjs, "shape": noun, "colour": _DE_COLOUR[s.colour],
        "size": _DE_SIZE[s.size], "pos_in": _DE_POS_IN[s.position], "bg": bg, "bg_dat": bg + "em",
        "bg_gen": bg + "en", "the": {"m": "der", "n": "das", "f": "die"}[gender],
        "pron": {"m": "er", "n": "es", "f": "sie"}[gender],
    }  # fmt: skip


# French (gender; size before the noun, colour after) ------------------------
_FR_SHAPE = {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
             "cross": ("croix", "f"), "diamond": ("losange", "m")}  # fmt: skip
_FR_COLOUR = {"red": ("rouge", "rouge"), "orange": ("orange", "orange"), "yellow": ("jaune", "jaune"),
              "green": ("vert", "verte"), "cyan": ("cyan", "cyan"), "blue": ("bleu", "bleue"),
              "purple": ("violet", "violette"), "pink": ("rose", "rose")}  # fmt: skip
_FR_SIZE = {"small": ("petit", "petite"), "large": ("grand", "grande")}
_FR_POS_IN = dict(zip(_POS_KEYS, ("en haut à gauche", "en haut à droite", "en bas à gauche", "en bas à droite",
                                  "au centre"), strict=True))  # fmt: skip
_FR_BG = {"black": ("noir", "noire"), "grey": ("gris", "grise"), "white": ("blanc", "blanche")}
_FR_TEMPLATES = (
    "{np} {pos_in} sur un fond {bg}",
    "{size} {shape} {colour}, {pos_in}, fond {bg}",
    "une image montrant {np} {pos_in}, sur un fond {bg} uni",
    "sur un fond {bg}, il y a {np} {pos_in}",
    "{the} {shape} est {colour} et {size}, et {pron} se trouve {pos_in} d'une image {bg_f}",
)


def _slots_fr(s: CaptionSpec) -> dict[str, str]:
    noun, gender = _FR_SHAPE[s.shape]
    g = 0 if gender == "m" else 1
    size, colour = _FR_SIZE[s.size][g], _FR_COLOUR[s.colour][g]
    return {
        "np": f"{('un', 'une')[g]} {size} {noun} {colour}", "size": size, "shape": noun, "colour": colour,
        "pos_in": _FR_POS_IN[s.position], "bg": _FR_BG[s.background][0], "bg_f": _FR_BG[s.background][1],
        "the": ("le", "la")[g], "pron": ("il", "elle")[g],
    }  # fmt: skip


# Russian (zero-shot; every shape noun is masculine) -------------------------
_RU_SHAPE = dict(zip(ATTRIBUTES["shape"], ("круг", "квадрат", "треугольник", "крест", "ромб"), strict=True))
_RU_COLOUR = dict(zip(ATTRIBUTES["colour"], ("красный", "оранжевый", "жёлтый", "зелёный", "бирюзовый", "синий",
                                             "фиолетовый", "розовый"), strict=True))  # fmt: skip
_RU_SIZE = {"small": "маленький", "large": "большой"}
_RU_POS_IN = dict(zip(_POS_KEYS, ("в левом верхнем углу", "в правом верхнем углу", "в левом нижнем углу",
                                  "в правом нижнем углу", "в центре"), strict=True))  # fmt: skip
_RU_BG = {"black": ("чёрный", "чёрном", "чёрного"), "grey": ("серый", "сером", "серого"),
          "white": ("белый", "белом", "белого")}  # fmt: skip
_RU_TEMPLATES = (
    "{size} {colour} {shape} {pos_in} на {bg_prep} фоне",
    "{size} {colour} {shape}, {pos_in}, фон {bg}",
    "изображение: {size} {colour} {shape} {pos_in}, на однотонном {bg_prep} фоне",
    "на {bg_prep} фоне {pos_in} находится {size} {colour} {shape}",
    "{shape} {colour} и {size}, он расположен {pos_in} {bg_gen} изображения",
)


def _slots_ru(s: CaptionSpec) -> dict[str, str]:
    bg, bg_prep, bg_gen = _RU_BG[s.background]
    return {
        "shape": _RU_SHAPE[s.shape], "colour": _RU_COLOUR[s.colour], "size": _RU_SIZE[s.size],
        "pos_in": _RU_POS_IN[s.position], "bg": bg, "bg_prep": bg_prep, "bg_gen": bg_gen,
    }  # fmt: skip


# Korean (zero-shot; particles follow the last syllable of the shape noun) ---
_KO_SHAPE = {"circle": ("원", "이", "은"), "square": ("정사각형", "이", "은"), "triangle": ("삼각형", "이", "은"),
             "cross": ("십자가", "가", "는"), "diamond": ("마름모", "가", "는")}  # fmt: skip
_KO_COLOUR = dict(zip(ATTRIBUTES["colour"], ("빨간색", "주황색", "노란색", "초록색", "청록색", "파란색", "보라색", "분홍색"), strict=True))
_KO_SIZE = {"small": ("작은", "작으며"), "large": ("큰", "크며")}
_KO_POS = dict(zip(_POS_KEYS, ("왼쪽 위", "오른쪽 위", "왼쪽 아래", "오른쪽 아래", "가운데"), strict=True))
_KO_BG = {"black": "검은색", "grey": "회색", "white": "흰색"}
_KO_TEMPLATES = (
    "{bg} 배경의 {pos}에 있는 {size} {colour} {shape}",
    "{size} {colour} {shape}, {pos}, {bg} 배경",
    "단색 {bg} 배경의 {pos}에 {size} {colour} {shape}{subj} 그려진 그림",
    "{bg} 배경 위 {pos}에 {size} {colour} {shape}{subj} 있습니다",
    "{shape}{topic} {colour}이고 {size_pred}, {bg} 그림의 {pos}에 놓여 있습니다",
)


def _slots_ko(s: CaptionSpec) -> dict[str, str]:
    noun, subj, topic = _KO_SHAPE[s.shape]
    size, size_pred = _KO_SIZE[s.size]
    return {
        "shape": noun, "subj": subj, "topic": topic, "colour": _KO_COLOUR[s.colour], "size": size,
        "size_pred": size_pred, "pos": _KO_POS[s.position], "bg": _KO_BG[s.background],
    }  # fmt: skip


_LANGS = {
    "en": (_EN_TEMPLATES, _slots_en),
    "zh": (_ZH_TEMPLATES, _slots_zh),
    "ja": (_JA_TEMPLATES, _slots_ja),
    "es": (_ES_TEMPLATES, _slots_es),
    "de": (_DE_TEMPLATES, _slots_de),
    "fr": (_FR_TEMPLATES, _slots_fr),
    "ru": (_RU_TEMPLATES, _slots_ru),
    "ko": (_KO_TEMPLATES, _slots_ko),
}
assert tuple(_LANGS) == LANGUAGES and all(len(t) == NUM_TEMPLATES for t, _ in _LANGS.values())

# ---------------------------------------------------------------------------
# Paraphrases: more phrasings of the trained languages, for stage 1's text-only parallel pairs only (never an
# image caption, never an eval prompt; ``WorldConfig.num_paraphrases``). Paraphrase ``k`` of every language is
# a translation of English paraphrase ``k``. None is a template of above (the held-out phrasing stays unseen):
# they put the position first, the background first, the attributes in predicates over several sentences, or
# the shape before its colour, as a large parallel corpus would. English ones use only words of
# :func:`english_vocabulary` (the base model's tokenizer knows no other word).
# ---------------------------------------------------------------------------
_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "en": (
        "{pos_in} there is {np} on a {bg} background",
        "{bg} background with {np} {pos_in}",
        "the {shape} is {size}. It is {colour}, and it is {pos_in}. The background is {bg}",
        "one object, {np}, is shown {pos_in} on a {bg} background",
        "{size} {shape}, {colour}, {pos_in}. {bg} background",
    ),
    "zh": (
        "{pos}有一个{size}的{colour}{shape}，背景是{bg}的",
        "{bg}背景，上面{pos}画着一个{size}{colour}{shape}",
        "{shape}很{size}，颜色是{colour}，放在{pos}。背景是{bg}",
        "只有一个物体：{pos}的{size}{colour}{shape}，{bg}底色",
        "{colour}{shape}，{size}的，{pos}，{bg}背景",
    ),
    "ja": (
        "{pos}に{size}{colour}の{shape}があり、背景は{bg}です",
        "{bg}の背景と、{pos}に描かれた{size}{colour}の{shape}",
        "{shape}は{size_pred}て{colour}で、{pos}にあります。背景は{bg}です",
        "物体は一つだけ：{pos}の{size}{colour}の{shape}、{bg}の背景",
        "{size}{shape}、色は{colour}、位置は{pos}、背景は{bg}",
    ),
    "es": (
        "{pos_in} hay {np} sobre un fondo {bg}",
        "fondo {bg} con {np} {pos_in}",
        "{the} {shape} es {size_post}, de color {colour_m}, y se encuentra {pos_in}. El fondo es {bg}",
        "un solo objeto, {np}, se muestra {pos_in} sobre un fondo {bg}",
        "se ve {np} {pos_in}, y el fondo es {bg}",
    ),
    "de": (
        "{pos_in} ist {np} auf {bg_dat} Hintergrund",
        "{bg_nom} Hintergrund mit {np_dat} {pos_in}",
        "{the} {shape} ist {size}. {Pron} ist {colour} und befindet sich {pos_in}. Der Hintergrund ist {bg}",
        "ein einziges Objekt, {np}, ist {pos_in} auf {bg_dat} Hintergrund zu sehen",
        "{shape} in {Colour}, {size}, {pos_in}. Hintergrund {bg}",
    ),
    "fr": (
        "{pos_in}, il y a {np} sur un fond {bg}",
        "fond {bg} avec {np} {pos_in}",
        "{the} {shape} est {size}. {Pron} est {colour} et placé{e} {pos_in}. Le fond est {bg}",
        "un seul objet, {np}, est montré {pos_in} sur un fond {bg}",
        "{shape} {colour}, {size}, {pos_in}. Fond {bg}",
    ),
}
NUM_PARAPHRASES = 5
assert set(_PARAPHRASES) == set(TRAINED_LANGUAGES) and all(len(t) == NUM_PARAPHRASES for t in _PARAPHRASES.values())


def _paraphrase_slots(spec: CaptionSpec, lang: str) -> dict[str, str]:
    """The caption slots of ``lang`` plus the few forms only a paraphrase uses."""
    slots = _LANGS[lang][1](spec)
    if lang == "de":
        noun, gender = _DE_SHAPE[spec.shape]
        dat = " ".join(_de_decline(stem, gender, "en") for stem in (_DE_SIZE[spec.size], _DE_COLOUR[spec.colour]))
        slots |= {"np_dat": f"{'einer' if gender == 'f' else 'einem'} {dat} {noun}", "bg_nom": slots["bg"] + "er",
                  "Pron": slots["pron"].capitalize(), "Colour": slots["colour"].capitalize()}  # fmt: skip
    elif lang == "fr":
        slots |= {"Pron": slots["pron"].capitalize(), "e": "e" if _FR_SHAPE[spec.shape][1] == "f" else ""}
    elif lang == "es":
        slots |= {"colour_m": _ES_COLOUR[spec.colour][0]}
    return slots


def paraphrase(spec: CaptionSpec, lang: str, k: int) -> str:
    """``spec`` in ``lang`` with paraphrase ``k`` (``spec.template`` is ignored); long specs get their filler."""
    if lang not in _PARAPHRASES:
        raise ValueError(f"lang={lang!r}: paraphrases exist for the trained languages {list(TRAINED_LANGUAGES)}")
    if not 0 <= k < NUM_PARAPHRASES:
        raise ValueError(f"k={k!r}: must be in [0, {NUM_PARAPHRASES})")
    return _with_filler(_PARAPHRASES[lang][k].format(**_paraphrase_slots(spec, lang)), spec, lang)


# ---------------------------------------------------------------------------
# Filler sentences of long captions: neutral description that names no attribute.
# Each row is one sentence in every language (same order as LANGUAGES).
# ---------------------------------------------------------------------------
FILLERS: tuple[dict[str, str], ...] = tuple(dict(zip(LANGUAGES, row, strict=True)) for row in (
    ("This picture was made by a computer program for a study of how machines read words.",
     "这张图片由计算机程序生成，用于研究机器如何理解文字。",
     "この画像は、機械が文章をどのように読むかを調べる研究のために、コンピュータープログラムで作られました。",
     "Esta imagen fue creada por un programa de ordenador para un estudio sobre cómo las máquinas leen palabras.",
     "Dieses Bild wurde von einem Computerprogramm für eine Studie darüber erstellt, wie Maschinen Wörter lesen.",
     "Cette image a été créée par un programme informatique pour une étude sur la façon dont les machines lisent les mots.",
     "Это изображение создано компьютерной программой для исследования того, как машины читают слова.",
     "이 그림은 기계가 글을 어떻게 읽는지 연구하기 위해 컴퓨터 프로그램으로 만들어졌습니다."),
    ("There are no people, animals, letters or numbers anywhere in the scene.",
     "画面中没有任何人物、动物、字母或数字。",
     "場面のどこにも、人、動物、文字、数字はありません。",
     "No hay personas, animales, letras ni números en ninguna parte de la escena.",
     "Nirgendwo in der Szene gibt es Menschen, Tiere, Buchstaben oder Zahlen.",
     "Il n'y a ni personnes, ni animaux, ni lettres, ni chiffres dans la scène.",
     "Нигде в сцене нет ни людей, ни животных, ни букв, ни цифр.",
     "장면 어디에도 사람, 동물, 글자, 숫자가 없습니다."),
    ("The drawing is simple and flat, with no shadows, no texture and no depth.",
     "这幅画简单而平面，没有阴影、没有纹理，也没有景深。",
     "絵はシンプルで平面的で、影も質感も奥行きもありません。",
     "El dibujo es simple y plano, sin sombras, sin textura y sin profundidad.",
     "Die Zeichnung ist einfach und flach, ohne Schatten, ohne Textur und ohne Tiefe.",
     "Le dessin est simple et plat, sans ombres, sans texture et sans profondeur.",
     "Рисунок простой и плоский, без теней, без текстуры и без глубины.",
     "그림은 단순하고 평면적이며, 그림자도 질감도 깊이도 없습니다."),
    ("It was rendered at a low resolution, so fine details are hard to see.",
     "它以很低的分辨率渲染，因此很难看清细节。",
     "低い解像度で描かれているため、細かい部分は見えにくいです。",
     "Se generó a baja resolución, así que los detalles finos son difíciles de ver.",
     "Es wurde in niedriger Auflösung gerendert, daher sind feine Details schwer zu erkennen.",
     "Elle a été rendue en basse résolution, donc les détails fins sont difficiles à voir.",
     "Оно отрисовано в низком разрешении, поэтому мелкие детали трудно разглядеть.",
     "낮은 해상도로 렌더링되어 세밀한 부분은 알아보기 어렵습니다."),
    ("Only one object is shown, and nothing else competes for attention in the frame.",
     "画面中只展示了一个物体，没有其他东西分散注意力。",
     "表示されている物体は一つだけで、ほかに注意を引くものはありません。",
     "Solo se muestra un objeto, y nada más compite por la atención en el encuadre.",
     "Es ist nur ein Objekt zu sehen, und nichts anderes lenkt die Aufmerksamkeit ab.",
     "Un seul objet est montré, et rien d'autre n'attire l'attention dans le cadre.",
     "Показан только один объект, и ничто другое не отвлекает внимание.",
     "물체는 하나만 보이며, 다른 어떤 것도 시선을 끌지 않습니다."),
    ("The lighting is even across the whole scene, and the camera looks straight at it.",
     "整个场景的光线均匀，镜头正对着它。",
     "場面全体の照明は均一で、カメラは正面からそれを見ています。",
     "La iluminación es uniforme en toda la escena, y la cámara la mira de frente.",
     "Die Beleuchtung ist in der ganzen Szene gleichmäßig, und die Kamera blickt direkt darauf.",
     "L'éclairage est uniforme dans toute la scène, et la caméra la regarde de face.",
     "Освещение во всей сцене равномерное, и камера смотрит прямо на неё.",
     "장면 전체의 조명이 고르고, 카메라는 정면에서 바라봅니다."),
    ("Such images are used to test whether a model follows every detail of a long prompt.",
     "这类图像用于测试模型是否遵循长提示中的每一个细节。",
     "このような画像は、モデルが長いプロンプトの細部まで従うかを確かめるために使われます。",
     "Este tipo de imágenes sirve para comprobar si un modelo sigue cada detalle de una descripción larga.",
     "Solche Bilder werden verwendet, um zu prüfen, ob ein Modell jedem Detail einer langen Beschreibung folgt.",
     "Ce genre d'images sert à vérifier si un modèle suit chaque détail d'une longue description.",
     "Такие изображения нужны, чтобы проверить, следует ли модель каждой детали длинного описания.",
     "이런 이미지는 모델이 긴 설명의 모든 세부 사항을 따르는지 확인하는 데 쓰입니다."),
    ("Please read the whole description carefully, because the important part comes at the end.",
     "请仔细阅读完整的描述，因为重要的部分在最后。",
     "大事な部分は最後にあるので、説明全体を注意深く読んでください。",
     "Lee toda la descripción con atención, porque la parte importante llega al final.",
     "Bitte lies die ganze Beschreibung sorgfältig, denn der wichtige Teil kommt am Ende.",
     "Lisez toute la description attentivement, car la partie importante arrive à la fin.",
     "Пожалуйста, внимательно прочитайте всё описание, потому что главное находится в конце.",
     "중요한 부분은 끝에 나오므로 설명 전체를 주의 깊게 읽어 주세요."),
    ("The scene has a calm and tidy look, like an icon or a sticker.",
     "画面看起来平静而整洁，像一个图标或一张贴纸。",
     "場面は落ち着いていて整っており、アイコンやステッカーのように見えます。",
     "La escena tiene un aspecto tranquilo y ordenado, como un icono o una pegatina.",
     "Die Szene wirkt ruhig und aufgeräumt, wie ein Symbol oder ein Aufkleber.",
     "La scène a un air calme et ordonné, comme une icône ou un autocollant.",
     "Сцена выглядит спокойной и аккуратной, как значок или наклейка.",
     "장면은 차분하고 깔끔해 보이며, 아이콘이나 스티커 같습니다."),
    ("Nobody signed the work, and it has no title, frame or border of any kind.",
     "这件作品没有署名，也没有标题、画框或任何边框。",
     "作品には署名もタイトルもなく、額縁や枠もまったくありません。",
     "Nadie firmó la obra, y no tiene título, marco ni borde de ningún tipo.",
     "Niemand hat das Werk signiert, und es hat keinen Titel, keinen Rahmen und keine Umrandung.",
     "Personne n'a signé l'œuvre, et elle n'a ni titre, ni cadre, ni bordure d'aucune sorte.",
     "Работа никем не подписана, и у неё нет ни названия, ни рамки, ни каймы.",
     "작품에는 서명도 제목도 없고, 액자나 테두리도 전혀 없습니다."),
))  # fmt: skip

# The slot that holds each attribute's word, by language (a dictionary's entry: the form the lexicon lists).
_LEXICON_SLOTS = {
    "shape": {lang: "shape" for lang in LANGUAGES},
    "colour": {lang: "colour" for lang in LANGUAGES},
    "size": {**{lang: "size" for lang in LANGUAGES}, "es": "size_post"},
    "position": {**{lang: "pos_in" for lang in LANGUAGES}, "zh": "pos", "ja": "pos", "ko": "pos"},
    "background": {lang: "bg" for lang in LANGUAGES},
}
_LEXICON_DEFAULTS = {"shape": "circle", "colour": "red", "position": "centre", "size": "small", "background": "black"}


def lexicon(lang: str) -> list[tuple[str, str]]:
    """``(word in lang, its English)`` for every attribute value: the lexicon's own form of each word (German's
    undeclined stem, French's masculine, ...), as a bilingual dictionary lists it. Sorted, no repeats.

    A parallel corpus holds such entries beside its sentences; stage 1 then sees each word alone, not only inside the
    training phrasings (a held-out phrasing may use a form those phrasings never do: German's predicative "rot")."""
    if lang not in _LANGS:
        raise ValueError(f"lang={lang!r}: unknown language; expected one of {list(LANGUAGES)}")
    slots, en_slots = _LANGS[lang][1], _LANGS["en"][1]
    out: set[tuple[str, str]] = set()
    for name in PROMPT_ATTRIBUTES:
        for value in ATTRIBUTES[name]:
            spec = CaptionSpec(**{**_LEXICON_DEFAULTS, name: value}, template=0)
            out.add((slots(spec)[_LEXICON_SLOTS[name][lang]], en_slots(spec)[_LEXICON_SLOTS[name]["en"]]))
    return sorted(out)


# Scripts written without spaces between sentences.
_NO_SPACE = {"zh", "ja"}
_FULL_STOP = {"zh": "。", "ja": "。"}


def short_caption(spec: CaptionSpec, lang: str) -> str:
    """The attribute phrase of ``spec`` in ``lang`` (template ``spec.template``), no filler."""
    if lang not in _LANGS:
        raise ValueError(f"lang={lang!r}: unknown language; expected one of {list(LANGUAGES)}")
    templates, slots = _LANGS[lang]
    return templates[spec.template].format(**slots(spec))


def caption(spec: CaptionSpec, lang: str) -> str:
    """The caption of ``spec`` in ``lang``: short phrase, or filler sentences then the phrase as a sentence."""
    return _with_filler(short_caption(spec, lang), spec, lang)


def _with_filler(text: str, spec: CaptionSpec, lang: str) -> str:
    """A short phrase as it stands in ``spec``'s caption: alone, or a sentence after its filler sentences."""
    if not spec.is_long:
        return text
    sentence = text[0].upper() + text[1:] + _FULL_STOP.get(lang, ".")
    sep = "" if lang in _NO_SPACE else " "
    return sep.join([FILLERS[i][lang] for i in spec.filler] + [sentence])


def filler_token_count(filler: tuple[int, ...]) -> int:
    """English CLIP-style tokens of the filler sentences (where the decisive sentence starts)."""
    return sum(clip_token_count(FILLERS[i]["en"]) for i in filler)


def max_filler_tokens() -> int:
    return filler_token_count(tuple(range(len(FILLERS))))


def choose_filler(rng: np.random.Generator, min_tokens: int) -> tuple[int, ...]:
    """Filler sentences in a random order, as few as reach ``min_tokens`` English tokens."""
    if min_tokens > max_filler_tokens():
        raise ValueError(f"min_tokens={min_tokens}: the fillers hold only {max_filler_tokens()} English tokens")
    chosen: list[int] = []
    for i in rng.permutation(len(FILLERS)).tolist():
        if filler_token_count(tuple(chosen)) >= min_tokens:
            break
        chosen.append(int(i))
    return tuple(chosen)


# English words that name an attribute value; a filler must contain none of them.
def attribute_words_en() -> frozenset[str]:
    words: set[str] = {"background"}
    for name in PROMPT_ATTRIBUTES:
        for value in ATTRIBUTES[name]:
            words.update(clip_tokens(value.replace("-", " ")))
    words.update(clip_tokens(" ".join(_EN_POS_IN.values())))
    return frozenset(words - {"in", "the"})


@functools.lru_cache(maxsize=1)
def english_vocabulary() -> tuple[str, ...]:
    """Every token (lowercased word or punctuation mark) an English caption or prompt can contain, sorted."""
    vocab: set[str] = set()
    for values in itertools.product(*(ATTRIBUTES[name] for name in PROMPT_ATTRIBUTES)):
        for template in range(NUM_TEMPLATES):
            vocab.update(clip_tokens(short_caption(CaptionSpec(*values, template=template), "en")))
    for row in FILLERS:
        vocab.update(clip_tokens(row["en"]))
    vocab.add(".")  # the full stop that ends the decisive sentence of a long caption
    return tuple(sorted(vocab))
