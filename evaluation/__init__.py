"""Evaluation as in the Textual Inversion paper: CLIP image/text similarity (`clip_eval`), the OpenAI CLIP
preprocessing (`preprocess`), concept coverage (`coverage`), CLIP ranking of candidates (`ranking`), the
runner for the paper's setups (`setups`, with its spec in `spec` and its tables in `results`) and the
human-captions dataset (`caption_data`).

All similarity values are raw cosine similarities (not CLIPScore). See docs/EVALUATION.md.
"""
