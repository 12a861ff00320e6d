"""rlhf_helpers: the tested logic behind the RLHF notebook suite.

Modules: `config` (profiles and stage configs), `seeding`, `tracking` (metrics.jsonl, summary.json),
`models` (the embedded default model, LoRA, 4-bit, reference by disabled adapter), `data` (formats and
validation), `concepts` (notebook 00's bandit maths), `plotting`, `run` (the papermill runner).
"""
import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# peft and TRL still read `model.is_gradient_checkpointing`, which transformers 5 deprecates: a FutureWarning in
# every training notebook that a reader can do nothing about. Our own code uses the new names.
_warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# bitsandbytes, imported by peft, says on CPUs with AVX512-BF16 that it could not fetch a 4-bit CPU kernel from
# the Hub. Nothing here runs 4-bit on a CPU (the `gpu` profile alone quantizes), so that line is noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# transformers checks a model's tensor-parallel plan at every load, and for a model with a classification head
# (the reward model) warns that `score.weight` and the norms "were not sharded". Nothing here shards tensors
# (several GPUs run data-parallel under accelerate), so that warning says nothing about this suite.
_logging.getLogger("transformers.distributed.tensor_parallel").setLevel(_logging.ERROR)
