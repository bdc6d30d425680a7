"""Text search over the catalogue: the evaluation protocol, lexical (BM25) and dense scoring, score
fusion, and the fine-tuned query encoder that the served `text_encoder` runs."""
