"""Runs a list of generation cases on one rank of an `mlx.launch` group, or in one process (the reference).

    mlx.launch --backend ring -n 2 -- python tests/distributed_worker.py cases.json results.json

Each case: a model directory, "mode" (tensor / pipeline / single), "dequantize", prompts (several:
one batch in the engine), "n" tokens, "chunk" (prefill chunk), optional "image" (the vision fixture
case name), "weights" (pipeline shares), "temp"/"seed". Rank 0 writes, per case, the tokens and
every rank's parameter and KV bytes.
"""

import json
import sys

import gemma3_mlx  # noqa: F401  (BLAS first)
import mlx.core as mx
import numpy as np

from gemma3_mlx import distributed
from gemma3_mlx.engine import Engine
from gemma3_mlx.loader import load_model
from gemma3_mlx.prompt_cache import PromptCache
from gemma3_mlx.settings import make_sampler

VLM_REF = "tests/fixtures/tiny_vlm/ref.safetensors"


def run_case(model, case: dict) -> dict:
    prompts, images = case["prompts"], None
    if case.get("image"):
        ref = mx.load(VLM_REF)
        prompts = [np.array(ref[f"{case['image']}.input_ids"])[0].tolist()]
        images = [np.array(ref["pixels_nhwc"][i]) for i in np.array(ref[f"{case['image']}.images"]).tolist()]
    engine = Engine(model, max_batch=len(prompts), prefill_chunk=case.get("chunk", 512))
    caches = [PromptCache(model) for _ in prompts]
    uids = [engine.submit(p, max_tokens=case["n"], stop_ids=(), cache=c, images=images,
                          sampler=make_sampler(case.get("temp", 0.0), seed=case.get("seed")))
            for p, c in zip(prompts, caches)]
    got = {u: [] for u in uids}
    while engine.has_work:
        for e in engine.step():
            if e.token is not None:
                got[e.uid].append(e.token)
    return {"tokens": [got[u] for u in uids], "params": distributed.parameter_bytes(model),
            "kv": sum(c.nbytes for c in caches)}


def main(cases_file: str, out_file: str) -> None:
    group = distributed.init()
    cases = json.loads(open(cases_file).read())
    results = []
    for case in cases:
        model, _ = distributed.load(case["dir"], group, case["mode"], dtype="float32",
                                    dequantize=case.get("dequantize"), weights=case.get("weights"))
        r = run_case(model, case)
        every = distributed.gather([r["params"], r["kv"]], group)
        results.append({"tokens": r["tokens"], "params": [int(x[0]) for x in every], "kv": [int(x[1]) for x in every]})
        del model
    if group.rank() == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)


def reference(case: dict) -> dict:
    """The same case in this process, unsplit."""
    return run_case(load_model(case["dir"], "float32", case.get("dequantize")), case)


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")  # tiny checkpoints have no tokenizer.model
    main(sys.argv[1], sys.argv[2])
