"""rlhf_helpers: the tested logic behind the RLHF notebook suite.

Modules: `config` (profiles and stage configs), `seeding`, `tracking` (metrics.jsonl, summary.json),
`models` (the embedded default model, LoRA, 4-bit, reference by disabled adapter), `data` (formats and
validation), `concepts` (notebook 00's bandit maths), `plotting`, `run` (the papermill runner).
"""
__version__ = "0.1.0"
