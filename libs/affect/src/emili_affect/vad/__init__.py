"""Text to valence-arousal-dominance: lexicons, tokenisation, out-of-lexicon estimation, scoring, evaluation.

Typical use::

    lexicon = load_lexicon("NRC-VAD-Lexicon.txt")
    embedder = SentenceTransformerEmbedder("var/artifacts/labeler/all-MiniLM-L6-v2")
    scorer = VADScorer(lexicon, embedder, cache=LocalEmbeddingCache("var/cache/vad"))
    scorer.score("I'm so happy today!").vad
"""

from emili_affect.vad.affect import AffectTable, affect_features, load_affect_tables
from emili_affect.vad.embed import (
    Embedder,
    EmbeddingCache,
    FixedEmbedder,
    LocalEmbeddingCache,
    MemoryEmbeddingCache,
    SentenceTransformerEmbedder,
    embedding_cache_key,
    lexicon_embeddings,
)
from emili_affect.vad.evaluate import evaluate_oov, holdout_split, pearson_r
from emili_affect.vad.fusion import (
    DEFAULT_TEMPLATES,
    FusionEstimator,
    TemplateEmbedder,
    WordFeaturizer,
    lexicon_text_features,
)
from emili_affect.vad.lemma import Lemmatizer, english_lemmas
from emili_affect.vad.lexicon import (
    DIMENSIONS,
    Lexicon,
    LexiconFormat,
    detect_format,
    load_lexicon,
    load_nrc_vad_v1,
    load_nrc_vad_v2,
    load_warriner,
)
from emili_affect.vad.oov import (
    OOV_METHODS,
    OOVEstimator,
    OOVMethod,
    RidgeEstimator,
    SoftmaxEstimator,
    TopKEstimator,
    make_estimator,
)
from emili_affect.vad.score import DEFAULT_MAX_CHARS, LEXICON_SOURCE, VAD, TextVAD, VADScorer
from emili_affect.vad.tokenize import DEFAULT_STOPWORDS, LexiconTokenizer, Tokens, normalise, raw_tokens

__all__ = [
    "DEFAULT_MAX_CHARS",
    "DEFAULT_STOPWORDS",
    "DEFAULT_TEMPLATES",
    "DIMENSIONS",
    "LEXICON_SOURCE",
    "OOV_METHODS",
    "VAD",
    "AffectTable",
    "Embedder",
    "EmbeddingCache",
    "FixedEmbedder",
    "FusionEstimator",
    "Lemmatizer",
    "Lexicon",
    "LexiconFormat",
    "LexiconTokenizer",
    "LocalEmbeddingCache",
    "MemoryEmbeddingCache",
    "OOVEstimator",
    "OOVMethod",
    "RidgeEstimator",
    "SentenceTransformerEmbedder",
    "SoftmaxEstimator",
    "TemplateEmbedder",
    "TextVAD",
    "Tokens",
    "TopKEstimator",
    "VADScorer",
    "WordFeaturizer",
    "affect_features",
    "detect_format",
    "embedding_cache_key",
    "english_lemmas",
    "evaluate_oov",
    "holdout_split",
    "lexicon_embeddings",
    "lexicon_text_features",
    "load_affect_tables",
    "load_lexicon",
    "load_nrc_vad_v1",
    "load_nrc_vad_v2",
    "load_warriner",
    "make_estimator",
    "normalise",
    "pearson_r",
    "raw_tokens",
]
